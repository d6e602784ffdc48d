"""What every endpoint family's serving shares: the engine, the settings, the model-name
check, sampling parameters, prompt encoding, one complete generation, and the public view
of the model (what anonymous callers may see of it).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from api.engine import Engine, GenerationChunk, GenerationRequest, SamplingParams
from api.engine.base import GenerationStream
from api.errors import InvalidRequestError, ModelNotFoundError, error_content, redact_paths
from api.middleware import current_request_id
from api.protocol import Usage
from api.settings import ModelSettings

INLINE_ENCODE_CHARS = 4000  # shorter texts tokenize in well under a millisecond
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


class ServingBase:
    """The engine and settings, and the steps every request takes on its way to the engine."""

    def __init__(self, engine: Engine, settings: ModelSettings):
        self.engine = engine
        self.settings = settings

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name:
            raise ModelNotFoundError(name, self.model_name)

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

    # ------------------------------------------------------------ tokens
    async def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Apply the chat template and tokenize; long texts off the event loop, so a
        200,000-character paste does not stall every other stream while it is tokenized."""
        if sum(len(m["content"]) for m in messages) < INLINE_ENCODE_CHARS:
            return self.engine.encode_chat(messages)
        return await asyncio.to_thread(self.engine.encode_chat, messages)

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

    async def complete(self, gen: GenerationRequest) -> Completion:
        return await self.collect(self.engine.generate(gen))

    @staticmethod
    async def collect(stream: GenerationStream,
                      on_text: Callable[[str], None] | None = None) -> Completion:
        """Read ``stream`` to its end (closing it whatever happens) into one completion;
        ``on_text`` sees each new piece of text as it arrives."""
        parts: list[str] = []
        last: GenerationChunk | None = None
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                if chunk.text and on_text is not None:
                    on_text(chunk.text)
                last = chunk
        finally:
            await stream.aclose()
        assert last is not None and last.finished
        return Completion("".join(parts), last.prompt_tokens, last.completion_tokens,
                          last.finish_reason or "stop")


def request_id() -> str:
    """The HTTP request's id (X-Request-ID), so an upstream's logs can be matched with ours."""
    given = current_request_id.get()
    return given if given != "-" else uuid.uuid4().hex


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def sse_relay(stream: GenerationStream, head: Sequence[str],
                    event: Callable[[GenerationChunk], str | None],
                    usage_event: Callable[[Usage], str] | None = None) -> AsyncIterator[str]:
    """The SSE ``data:`` lines of an OpenAI-style stream (chat and text completions): ``head``
    first, each chunk as ``event`` makes it (None: nothing to send), the usage after the
    last one when ``usage_event`` is given, then ``[DONE]``. A mid-stream failure is an
    OpenAI error event before ``[DONE]``; the stream is closed whatever happens (a client
    that leaves, even before the first line, stops its generation)."""
    try:
        for line in head:
            yield line
        async for chunk in stream:
            line = event(chunk)
            if line is not None:
                yield line
            if chunk.finished and usage_event is not None:
                yield usage_event(usage(chunk.prompt_tokens, chunk.completion_tokens))
    except Exception as exc:  # mid-stream failure: an OpenAI error event, then [DONE]
        _, body, _ = error_content(exc)
        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    finally:  # the client left mid-stream: stop generating for it
        await stream.aclose()
    yield "data: [DONE]\n\n"
