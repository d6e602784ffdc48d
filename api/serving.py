"""Serving logic: turn API requests into engine calls and engine output into
response objects. No HTTP here: routers turn these objects into responses, and
the Gradio UI calls the same functions in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from api.engine import Engine, GenerationChunk, GenerationRequest, SamplingParams
from api.errors import InvalidRequestError, ModelNotFoundError, clip, error_content, redact_paths
from api.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    SummarizeRequest,
    SummarizeResponse,
    SummarizeUsage,
    Usage,
)
from api.middleware import current_request_id
from api.settings import ModelSettings
from api.text import is_blank, normalize_text

log = logging.getLogger("thai.serving")
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


class Serving:
    """Shared by the OpenAI routes, the summarize route and the UI."""

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

    # ---------------------------------------------------------------- chat
    def chat_messages(self, request: ChatCompletionRequest) -> list[dict[str, str]]:
        if len(request.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"{len(request.messages)} messages is more than this server's limit of "
                f"{self.settings.max_messages} (THAI_MAX_MESSAGES)", param="messages",
                code="too_many_messages")
        messages = []
        for message in request.messages:
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": normalize_text(message.text())})
        if all(is_blank(m["content"]) for m in messages if m["role"] == "user") and any(
                m["role"] == "user" for m in messages):
            raise InvalidRequestError("the user messages are empty (only whitespace or invisible "
                                      "characters)", param="messages")
        return messages

    async def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the chat template and tokenize; long texts off the event loop, so a
        200,000-character paste does not stall every other stream while it is tokenized."""
        if sum(len(m["content"]) for m in messages) < INLINE_ENCODE_CHARS:
            return self.engine.encode_chat(messages)
        return await asyncio.to_thread(self.engine.encode_chat, messages)

    async def chat_request(self, request: ChatCompletionRequest) -> GenerationRequest:
        self.check_model(request.model)
        ignored = request.unsupported_fields()
        if ignored:  # names chosen by the client: a few, each clipped (the log filter escapes them)
            names = sorted(clip(name, 64) for name in ignored)
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            log.info("ignoring unsupported request field(s): %s%s", ", ".join(names[:8]), more)
        params = self.sampling_params(
            max_tokens=request.requested_max_tokens(), temperature=request.temperature,
            top_p=request.top_p, stop=request.stop, seed=request.seed,
            min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
            no_repeat_ngram_size=request.no_repeat_ngram_size)
        messages = self.chat_messages(request)
        return GenerationRequest(prompt_ids=await self.encode(messages), params=params,
                                 request_id=_request_id(), messages=messages,
                                 passthrough=request.passthrough_fields())

    async def complete(self, gen: GenerationRequest) -> Completion:
        parts: list[str] = []
        last: GenerationChunk | None = None
        stream = self.engine.generate(gen)
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                last = chunk
        finally:
            await stream.aclose()
        assert last is not None and last.finished
        return Completion("".join(parts), last.prompt_tokens, last.completion_tokens,
                          last.finish_reason or "stop")

    async def chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        result = await self.complete(await self.chat_request(request))
        return ChatCompletionResponse(
            model=self.model_name,
            choices=[ChatCompletionChoice(message=ChatCompletionMessage(content=result.text),
                                          finish_reason=result.finish_reason)],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )

    async def chat_completion_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then yield SSE ``data:`` lines."""
        stream = self.engine.generate(await self.chat_request(request))
        try:
            await stream.wait_open()
        except BaseException:
            await stream.aclose()
            raise
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return self._sse(stream, include_usage)

    async def _sse(self, stream: AsyncIterator[GenerationChunk], include_usage: bool) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=ident, created=created, model=self.model_name,
                                        choices=choices, usage=usage)
            return f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"

        yield event([ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        try:
            async for chunk in stream:
                if chunk.text or chunk.finished:
                    yield event([ChatCompletionChunkChoice(
                        delta=DeltaMessage(content=chunk.text) if chunk.text else DeltaMessage(),
                        finish_reason=chunk.finish_reason if chunk.finished else None)])
                if chunk.finished:
                    if include_usage:
                        yield event([], _usage(chunk.prompt_tokens, chunk.completion_tokens))
        except Exception as exc:  # mid-stream failure: an OpenAI error event, then [DONE]
            _, body, _ = error_content(exc)
            yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        finally:  # the client left mid-stream: stop generating for it
            await stream.aclose()
        yield "data: [DONE]\n\n"

    # ----------------------------------------------------------- summarize
    def summary_messages(self, text: str) -> list[dict[str, str]]:
        text = normalize_text(text).strip()
        if is_blank(text):
            raise InvalidRequestError("text is empty (only whitespace or invisible characters); "
                                      "send the Thai text to summarize", param="text")
        messages = []
        if self.settings.summary_system_prompt:
            messages.append({"role": "system", "content": self.settings.summary_system_prompt})
        messages.append({"role": "user", "content": self.settings.summary_prompt.replace("{text}", text)})
        return messages

    async def summary_request(self, request: SummarizeRequest) -> GenerationRequest:
        self.check_model(request.model)
        params = self.sampling_params(max_tokens=request.max_tokens,
                                      temperature=request.temperature, top_p=request.top_p)
        messages = self.summary_messages(request.text)
        return GenerationRequest(prompt_ids=await self.encode(messages), params=params,
                                 request_id=_request_id(), messages=messages)

    async def summarize(self, request: SummarizeRequest) -> SummarizeResponse:
        result = await self.complete(await self.summary_request(request))
        return SummarizeResponse(
            summary=result.text.strip(), model=self.model_name, finish_reason=result.finish_reason,
            usage=SummarizeUsage(input_tokens=result.prompt_tokens,
                                 output_tokens=result.completion_tokens,
                                 total_tokens=result.prompt_tokens + result.completion_tokens))


def _request_id() -> str:
    """The HTTP request's id (X-Request-ID), so an upstream's logs can be matched with ours."""
    given = current_request_id.get()
    return given if given != "-" else uuid.uuid4().hex


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
