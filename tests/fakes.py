"""A fake engine for unit tests of the serving layer (the real-model tests are separate)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from api.engine import Engine, EngineInfo, EngineState, GenerationChunk, GenerationRequest
from api.engine.base import GenerationStream


class FakeEngine(Engine):
    """Tokens are characters; the reply echoes the last user message, one char per token."""

    def __init__(self, *, ready: bool = True, delay: float = 0.0, fail: BaseException | None = None,
                 max_context: int = 4096, max_batch_size: int = 1):
        self.info = EngineInfo(model_name="thai-qwen-lora", base_model="fake/base", adapter="fake/lora",
                               device="cpu", dtype="float32", max_context=max_context,
                               max_batch_size=max_batch_size)
        self.state = EngineState.LOADING
        self._ready, self.delay, self.fail = ready, delay, fail
        self.started_at = 0.0
        self.requests: list[GenerationRequest] = []
        self.cancelled = 0
        self.streams: list[_GeneratorStream] = []  # every stream generate() returned
        self.running = 0  # generations started and not yet ended (finished, failed or closed)
        self.max_running = 0  # the most that ran at once
        self.encode_calls: list[tuple] = []  # encode / encode_messages calls and their options

    async def start(self) -> None:
        import time

        self.started_at = time.time()
        if self._ready:
            self.state = EngineState.READY

    async def stop(self) -> None:
        self.state = EngineState.STOPPED

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        if self.state is not EngineState.READY:
            from api.engine.errors import ModelNotReadyError

            raise ModelNotReadyError("the model is still loading")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return [ord(c) for c in text]

    def count_tokens(self, text: str) -> int:
        return len(text)

    # /tokenize, /detokenize: characters are tokens (ids are code points); the options the
    # serving layer passed are recorded, since a character tokenizer has no special tokens.
    VOCAB_SIZE = 0x110000

    def _check_ready(self) -> None:
        if self.state is not EngineState.READY:
            from api.engine.errors import ModelNotReadyError

            raise ModelNotReadyError("the model is still loading")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._check_ready()
        self.encode_calls.append(("encode", add_special_tokens))
        return [ord(c) for c in text]

    def encode_messages(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                        add_special_tokens: bool = False, tools: Sequence[dict] | None = None,
                        continue_final_message: bool = False,
                        template_kwargs: dict | None = None) -> list[int]:
        self.encode_calls.append(("encode_messages", add_generation_prompt, add_special_tokens))
        self.template_options = {"continue_final_message": continue_final_message,
                                 "template_kwargs": template_kwargs}
        ids = self.encode_chat(messages, tools)
        return ids if add_generation_prompt else ids[:-1]  # something visibly different

    def decode(self, ids: Sequence[int]) -> str:
        self._check_ready()
        return "".join(chr(i) for i in ids)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        self._check_ready()
        return [chr(i).encode("utf-8", "surrogatepass") for i in ids]

    @property
    def vocab_size(self) -> int:
        self._check_ready()
        return self.VOCAB_SIZE

    def generate(self, request: GenerationRequest) -> GenerationStream:
        from api.engine.errors import ContextLengthExceededError

        if len(request.prompt_ids) + request.params.max_tokens > self.info.max_context:
            raise ContextLengthExceededError("too long")
        self.requests.append(request)
        stream = _GeneratorStream(self._run(request))
        self.streams.append(stream)
        return stream

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        prompt = "".join(chr(i) for i in request.prompt_ids)
        reply = prompt.rsplit(">", 1)[-1][::-1] or "?"
        n = len(request.prompt_ids)
        emitted = 0
        finished = False
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            for i, ch in enumerate(reply[: request.params.max_tokens]):
                if self.fail is not None and i == 1:
                    raise self.fail
                await asyncio.sleep(self.delay)
                emitted += 1
                last = emitted == min(len(reply), request.params.max_tokens)
                reason = None if not last else ("length" if len(reply) > request.params.max_tokens else "stop")
                finished = last
                yield GenerationChunk(ch, n, emitted, finished=last, finish_reason=reason)
        finally:
            self.running -= 1
            if not finished:
                self.cancelled += 1


class _GeneratorStream(GenerationStream):
    """An async generator seen through the engine's stream interface."""

    def __init__(self, chunks: AsyncIterator[GenerationChunk]):
        self._chunks = chunks
        self.closed = False  # read to its end, failed, or closed: nothing runs for it any more

    async def __anext__(self) -> GenerationChunk:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            self.closed = True
            raise

    async def aclose(self) -> None:
        self.closed = True
        await self._chunks.aclose()
