"""What every endpoint family's serving shares: the engine, the settings, the model-name
check, sampling parameters, prompt encoding, one complete generation, and the public view
of the model (what anonymous callers may see of it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from api.engine import Engine, GenerationChunk, GenerationRequest, GrammarSpec, SamplingParams, TokenLogprob
from api.engine.base import GenerationStream
from api.engine.errors import GrammarError
from api.engine.tenants import LOCAL_TENANT
from api.errors import InvalidRequestError, ModelNotFoundError, clip, error_content, redact_paths
from api.middleware import current_request_id
from api.protocol import SamplingFields, Usage
from api.serving.structured import grammar_for
from api.settings import ModelSettings

log = logging.getLogger("thai.serving")

INLINE_ENCODE_CHARS = 4000  # shorter texts tokenize in well under a millisecond
# Prompt log probabilities (prompt_logprobs, or echo with logprobs) hold prompt x vocabulary
# floats while the prompt is prefilled: the prompt is refused above this many (1 GiB of float32).
MAX_PROMPT_LOGPROB_FLOATS = 2**28
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# ------------------------------------------------------- what anyone may see
# /health, /ready, /v1/models and the UI's banner are open to anonymous users (probes need
# no key; the UI is public unless THAI_PROTECT_UI). They name the served model, the device
# and dtype, whether an adapter is applied, and the base model only when it is a public hub
# id: never a folder on the server, whose path tells an attacker the user names and layout.
def public_base_model(name: str | None) -> str | None:
    """``name`` when it is a Hugging Face hub id (``Qwen/Qwen2.5-1.5B-Instruct``), else None."""
    if not name or not _HUB_ID.fullmatch(name) or name.startswith("."):
        return None
    try:
        if Path(name).expanduser().exists():  # "models/base" is a relative folder, not an id
            return None
    except OSError:
        return None
    return name


def private_paths(engine: Engine) -> list[str]:
    """The model folders this server knows of (as configured and resolved), to redact."""
    info, settings = engine.info, getattr(engine, "settings", None)
    local = [info.adapter, getattr(settings, "lora_path", None), getattr(settings, "demo_dir", None)]
    for base in (info.base_model, getattr(settings, "base_model", None)):
        if base and public_base_model(base) is None:
            local.append(base)
    paths: list[str] = []
    for path in filter(None, local):
        paths.append(path)
        try:
            paths.append(str(Path(path).expanduser().resolve()))
        except (OSError, RuntimeError):
            pass
    return paths


def public_failure(engine: Engine) -> str | None:
    """Why the engine cannot serve, without server paths (the log has the full text)."""
    failure = engine.failure()
    return redact_paths(failure, private_paths(engine)) if failure else None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    token_ids: list[int] = field(default_factory=list)


class ServingBase:
    """The engine and settings, and the steps every request takes on its way to the engine."""

    def __init__(self, engine: Engine, settings: ModelSettings):
        self.engine = engine
        self.settings = settings
        # Whom requests are for when the caller names nobody (api.engine.tenants).
        self.default_tenant = LOCAL_TENANT

    def tenant(self, tenant: str | None) -> str:
        return tenant or self.default_tenant

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: str | None) -> None:
        """A 404 model_not_found unless ``name`` is a model the engine serves (the served
        model, or with several LoRA adapters, an adapter's or the base's name)."""
        if name and not self.engine.serves(name):
            served = ", ".join(f"`{m.name}`" for m in self.engine.served_models())
            raise ModelNotFoundError(name, served.strip("`"))

    def engine_model(self, name: str | None) -> str | None:
        """What a GenerationRequest's ``model`` gets: the name that picks the adapter, None
        for the served model (so an engine that serves one model sees nothing new)."""
        return None if not name or name == self.model_name else name

    # ------------------------------------------------------------ sampling
    def sampling_params(self, *, max_tokens: int | None, temperature: float | None,
                        top_p: float | None, stop: list[str] | None = None,
                        seed: int | None = None, min_tokens: int = 0, ignore_eos: bool = False,
                        no_repeat_ngram_size: int | None = None) -> SamplingParams:
        s = self.settings
        max_tokens = max_tokens if max_tokens is not None else s.max_new_tokens
        if max_tokens > s.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}, above this server's limit of {s.max_tokens_limit} "
                "(THAI_MAX_TOKENS_LIMIT)", param="max_tokens", code="max_tokens_too_large")
        if min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({min_tokens}) must not exceed max_tokens "
                                      f"({max_tokens})", param="min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p if top_p is None else top_p,
            seed=seed,
            stop=tuple(stop or ()),
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            no_repeat_ngram_size=(s.no_repeat_ngram_size if no_repeat_ngram_size is None
                                  else no_repeat_ngram_size),
        )

    async def openai_params(self, request: SamplingFields, *, prompt_tokens: int,
                            max_tokens: int | None, no_repeat_ngram_size: int,
                            logprobs: int | None = None, prompt_logprobs: int | None = None,
                            grammar: GrammarSpec | None = None,
                            grammar_param: str | None = None,
                            sequences: int | None = None) -> SamplingParams:
        """The OpenAI routes' sampling: vLLM's defaults (no max_tokens: the rest of the
        window, at most THAI_MAX_TOKENS_LIMIT and each choice's part of the output bounds,
        :meth:`output_room`; no n-gram blocking), its extensions, and
        the output constraint (``grammar``, else what the request's fields ask for),
        checked by the engine now so a schema it cannot enforce is a 400. ``sequences``:
        how many sequences the request generates in all (several prompts x n; default n)."""
        sequences = sequences or request.n
        if max_tokens is None:
            room = self.engine.info.max_context - prompt_tokens
            max_tokens = max(1, min(room, self.settings.max_tokens_limit,
                                    self.output_room(sequences, logprobs)))
        params = self.sampling_params(
            max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
            stop=request.stop, seed=request.seed, min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, no_repeat_ngram_size=no_repeat_ngram_size)
        self.check_output_bound(sequences, max_tokens, logprobs, prompt_tokens, prompt_logprobs)
        self.check_priority(request)
        if grammar is None:
            grammar, grammar_param = grammar_for(request)
        if grammar is not None:
            try:
                await self.engine.check_grammar(grammar)
            except GrammarError as exc:
                raise InvalidRequestError(f"{grammar_param} cannot be enforced: {exc}",
                                          param=grammar_param,
                                          code="invalid_structured_output") from None
        return dataclasses.replace(
            params, top_k=max(request.top_k or 0, 0), min_p=request.min_p or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=tuple((int(key), bias) for key, bias in (request.logit_bias or {}).items()
                             if self._check_token_id(int(key), "logit_bias")),
            stop_token_ids=tuple(token for token in request.stop_token_ids or ()
                                 if self._check_token_id(token, "stop_token_ids")),
            include_stop_str_in_output=request.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar)

    # ------------------------------------------------ one request's output
    # n x max_tokens tokens and their log probabilities are what one small request can make
    # the server compute and send (a 64 MB body from 200 bytes): both have a bound.
    def output_room(self, n: int, logprobs: int | None) -> int:
        """The most max_tokens that ``n`` choices (with ``logprobs`` alternatives) may have:
        the default when a request names none."""
        room = self.settings.max_output_tokens_per_request // n
        if logprobs is not None:
            room = min(room, self.settings.max_logprob_entries // (n * (logprobs + 1)))
        return room

    def check_output_bound(self, n: int, max_tokens: int, logprobs: int | None,
                           prompt_tokens: int = 0, prompt_logprobs: int | None = None) -> None:
        """A 400 naming the setting when the request may generate more than one request may."""
        s = self.settings
        if n * max_tokens > s.max_output_tokens_per_request:
            raise InvalidRequestError(
                f"n x max_tokens is {n} x {max_tokens} = {n * max_tokens} tokens, above this "
                f"server's limit of {s.max_output_tokens_per_request} output tokens per request "
                "(THAI_MAX_OUTPUT_TOKENS_PER_REQUEST); ask for fewer choices or tokens",
                param="max_tokens" if n == 1 else "n", code="output_too_large")
        entries = 0
        if logprobs is not None:
            entries += n * max_tokens * (logprobs + 1)
        if prompt_logprobs is not None:
            entries += n * prompt_tokens * (prompt_logprobs + 1)
        if entries > s.max_logprob_entries:
            raise InvalidRequestError(
                f"this request may return {entries} log probabilities (n x (max_tokens x "
                "(top logprobs + 1), plus the prompt's with echo)), above this server's limit of "
                f"{s.max_logprob_entries} (THAI_MAX_LOGPROB_ENTRIES); ask for fewer choices, "
                "tokens or top logprobs", param="logprobs", code="output_too_large")

    def check_priority(self, request: SamplingFields) -> None:
        """``priority`` orders this caller's requests in the local engine's queue; an
        upstream engine schedules across every caller, so it is refused there, not dropped."""
        if request.priority and self.engine.info.engine == "openai":
            raise InvalidRequestError(
                "priority is not available with THAI_ENGINE=openai: it orders a caller's own "
                "requests in the local engine's queue", param="priority",
                code="unsupported_field")

    def _check_token_id(self, token: int, param: str) -> bool:
        """True for an id of this model's vocabulary; a 400 naming ``param`` otherwise."""
        vocab = self.engine.vocab_size
        if not 0 <= token < vocab:
            raise InvalidRequestError(f"{param} names token {clip(str(token), 32)}, not a token id "
                                      f"of this model (ids are 0 to {vocab - 1})", param=param,
                                      code="invalid_token_id")
        return True

    def check_openai_fields(self, request: SamplingFields, route: str,
                            relayed_only: dict[str, bool]) -> None:
        """A field the request's schema does not declare is a 400 naming it, whichever the
        engine: the schema is the one list of what is accepted, and an upstream engine
        forwards only the declared fields of ``SamplingFields.PASSED_ON`` (so the upstream's
        own extensions, e.g. vLLM's best_of, priority or chat_template, cannot bypass this
        server's limits). An upstream engine's relay carries only text back: what needs more
        (``relayed_only``: name -> whether the request uses it) is refused there too."""
        unknown = sorted(clip(name, 64) for name in request.unknown_fields())
        if unknown:
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            # names chosen by the client: a few, each clipped (the log filter escapes them)
            log.info("refused unsupported field(s) for %s: %s%s", route, ", ".join(unknown[:8]), more)
            raise InvalidRequestError(
                f"unsupported field(s) for {route}: {', '.join(unknown[:8])}{more}; see the "
                "README's list of supported fields", param=unknown[0], code="unsupported_field")
        used = [name for name, is_used in relayed_only.items() if is_used]
        if self.engine.info.engine == "openai" and used:
            raise InvalidRequestError(f"{used[0]} is not available with THAI_ENGINE=openai: only "
                                      "text is relayed from the upstream servers", param=used[0],
                                      code="unsupported_field")

    @staticmethod
    def choice_requests(n: int, prompt_ids: list[int], params: SamplingParams,
                        **fields) -> list[GenerationRequest]:
        """One engine request per choice (``n``), seeds ``seed``, ``seed + 1``, ... so seeded
        choices differ from each other and repeat across calls."""
        rid = request_id()
        gens = []
        for i in range(n):
            seed = None if params.seed is None else (params.seed + i) % 2**63
            gens.append(GenerationRequest(
                prompt_ids=list(prompt_ids), params=dataclasses.replace(params, seed=seed),
                request_id=rid if n == 1 else f"{rid}-{i}", **fields))
        return gens

    # ------------------------------------------------------------ tokens
    def truncate_prompt(self, ids: list[int], keep: int | None) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: as many
        as the context window holds); a 400 for more than the window or for 0."""
        if keep is None:
            return ids
        window = self.engine.info.max_context
        if keep == -1:
            keep = window
        if keep == 0 or keep > window:
            raise InvalidRequestError(
                f"truncate_prompt_tokens is {keep}: it must be -1 or 1 to the context window "
                f"({window} tokens)", param="truncate_prompt_tokens")
        return ids[-keep:]

    def check_prompt_logprobs(self, prompt_tokens: int, prompt_logprobs: int | None,
                              param: str = "prompt_logprobs") -> None:
        """Prompt log probabilities hold prompt x vocabulary floats while the prompt is
        prefilled: a prompt above :data:`MAX_PROMPT_LOGPROB_FLOATS` of them is refused, and
        an upstream engine (which relays text only) cannot give them."""
        if prompt_logprobs is None:
            return
        vocab = self.engine.vocab_size
        if prompt_tokens * vocab > MAX_PROMPT_LOGPROB_FLOATS:
            raise InvalidRequestError(
                f"prompt log probabilities are limited to prompts of "
                f"{MAX_PROMPT_LOGPROB_FLOATS // vocab} tokens here; this one has "
                f"{prompt_tokens}", param=param, code="prompt_too_long_for_logprobs")

    async def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """Apply the chat template and tokenize; long texts off the event loop, so a
        200,000-character paste does not stall every other stream while it is tokenized."""
        size = sum(len(m.get("content") or "") for m in messages) + len(json.dumps(tools or []))
        if size < INLINE_ENCODE_CHARS:
            return self.engine.encode_chat(messages, tools)
        return await asyncio.to_thread(self.engine.encode_chat, messages, tools)

    async def count_tokens(self, text: str) -> int:
        """The tokenizer's count for ``text``; long texts off the event loop."""
        if len(text) < INLINE_ENCODE_CHARS:
            return self.engine.count_tokens(text)
        return await asyncio.to_thread(self.engine.count_tokens, text)

    # ---------------------------------------------------------- generation
    async def open_stream(self, gen: GenerationRequest) -> GenerationStream:
        """Admit ``gen`` and wait until it has really started (an upstream engine's 429 or
        503 raises here); the caller owns the stream and must close it."""
        stream = self.engine.generate(gen)
        try:
            await stream.wait_open()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def open_streams(self, gens: Sequence[GenerationRequest]) -> list[GenerationStream]:
        """:meth:`open_stream` for each of ``gens`` (``n`` choices); if one cannot start,
        those already started are closed before the error is raised."""
        streams: list[GenerationStream] = []
        try:
            for gen in gens:
                streams.append(await self.open_stream(gen))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    async def complete(self, gen: GenerationRequest) -> Completion:
        return await self.collect(self.engine.generate(gen))

    async def complete_all(self, gens: Sequence[GenerationRequest]) -> list[Completion]:
        """Every one of ``gens`` to its end, concurrently (they batch together)."""
        streams = await self.open_streams(gens)
        tasks = [asyncio.ensure_future(self.collect(stream)) for stream in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                await stream.aclose()

    @staticmethod
    async def collect(stream: GenerationStream,
                      on_text: Callable[[str], None] | None = None) -> Completion:
        """Read ``stream`` to its end (closing it whatever happens) into one completion;
        ``on_text`` sees each new piece of text as it arrives."""
        parts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        prompt_logprobs = None
        last: GenerationChunk | None = None
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                logprobs.extend(chunk.logprobs)
                token_ids.extend(chunk.token_ids)
                if chunk.prompt_logprobs is not None:
                    prompt_logprobs = chunk.prompt_logprobs
                if chunk.text and on_text is not None:
                    on_text(chunk.text)
                last = chunk
        finally:
            await stream.aclose()
        assert last is not None and last.finished
        return Completion("".join(parts), last.prompt_tokens, last.completion_tokens,
                          last.finish_reason or "stop", logprobs, prompt_logprobs, token_ids)


def request_id() -> str:
    """The HTTP request's id (X-Request-ID), so an upstream's logs can be matched with ours."""
    given = current_request_id.get()
    return given if given != "-" else uuid.uuid4().hex


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def merged(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(choice index, chunk) from several streams as the chunks arrive (``n`` choices)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: GenerationStream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
        except Exception as exc:
            await queue.put((index, None, exc))
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                open_streams -= 1
            else:
                yield index, chunk
    finally:
        for task in tasks:
            task.cancel()


async def sse_relay(streams: Sequence[GenerationStream], head: Sequence[str],
                    event: Callable[[int, GenerationChunk, Usage | None], str | None],
                    usage_event: Callable[[Usage], str] | None = None, *,
                    continuous_usage: bool = False,
                    prompt_of: Sequence[int] | None = None) -> AsyncIterator[str]:
    """The SSE ``data:`` lines of an OpenAI-style stream (chat and text completions, one
    stream per choice): ``head`` first, each chunk as ``event`` makes it from its choice's
    index (None: nothing to send), the usage after the last choice finished when
    ``usage_event`` is given (each prompt counted once, as vLLM does: ``prompt_of`` names
    each stream's prompt, all the same one by default), then ``[DONE]``. With
    ``continuous_usage`` (vLLM's ``continuous_usage_stats``) ``event`` is also given the
    usage so far, for every chunk. A mid-stream failure is an OpenAI error event before
    ``[DONE]``; the streams are closed whatever happens (a client that leaves, even before
    the first line, stops them)."""
    prompt_of = list(prompt_of) if prompt_of is not None else [0] * len(streams)
    prompts: dict[int, int] = {}
    generated = [0] * len(streams)
    try:
        for line in head:
            yield line
        async for index, chunk in merged(streams):
            prompts[prompt_of[index]] = chunk.prompt_tokens
            generated[index] = chunk.completion_tokens
            so_far = usage(sum(prompts.values()), sum(generated)) if continuous_usage else None
            line = event(index, chunk, so_far)
            if line is not None:
                yield line
        if usage_event is not None:
            yield usage_event(usage(sum(prompts.values()), sum(generated)))
    except Exception as exc:  # mid-stream failure: an OpenAI error event, then [DONE]
        _, body, _ = error_content(exc)
        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    finally:  # the client left mid-stream: stop generating for it
        for stream in streams:
            await stream.aclose()
    yield "data: [DONE]\n\n"
