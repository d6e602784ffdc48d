"""OpenAI chat completions: requests to engine calls, engine output to responses and SSE."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from api.engine import GenerationChunk, GenerationRequest
from api.engine.base import GenerationStream
from api.errors import InvalidRequestError, clip
from api.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)
from api.serving.common import ServingBase, request_id, sse_relay, usage
from api.text import is_blank, normalize_text

log = logging.getLogger("thai.serving")


class ChatServing(ServingBase):
    """``POST /v1/chat/completions`` and the UI's chat tab."""

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
                                 request_id=request_id(), messages=messages,
                                 passthrough=request.passthrough_fields())

    async def chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        result = await self.complete(await self.chat_request(request))
        return ChatCompletionResponse(
            model=self.model_name,
            choices=[ChatCompletionChoice(message=ChatCompletionMessage(content=result.text),
                                          finish_reason=result.finish_reason)],
            usage=usage(result.prompt_tokens, result.completion_tokens),
        )

    async def chat_completion_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then yield SSE ``data:`` lines."""
        stream = await self.open_stream(await self.chat_request(request))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return self._sse(stream, include_usage)

    def _sse(self, stream: GenerationStream, include_usage: bool) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(choices: list[ChatCompletionChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=ident, created=created, model=self.model_name,
                                        choices=choices, usage=usage)
            return f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"

        def delta(chunk: GenerationChunk) -> str | None:
            if not (chunk.text or chunk.finished):
                return None
            return event([ChatCompletionChunkChoice(
                delta=DeltaMessage(content=chunk.text) if chunk.text else DeltaMessage(),
                finish_reason=chunk.finish_reason if chunk.finished else None)])

        first = event([ChatCompletionChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
        return sse_relay(stream, [first], delta,
                         (lambda totals: event([], totals)) if include_usage else None)
