"""OpenAI's legacy text completions (``POST /v1/completions``) as vLLM serves them: one
prompt per request, a text or its token ids, continued as is (no chat template)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from api.engine import GenerationChunk, GenerationRequest
from api.errors import InvalidRequestError, clip
from api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse, Usage
from api.serving.common import INLINE_ENCODE_CHARS, ServingBase, request_id, sse_relay, usage

# Fields whose other values change the response's shape (several choices, log probabilities):
# refused whatever the engine, since only one choice's text is relayed from an upstream either.
SHAPE_FIELDS = ("n", "best_of", "logprobs")


class CompletionServing(ServingBase):
    """``POST /v1/completions``."""

    def completion_extras(self, request: CompletionRequest) -> dict[str, object]:
        """The fields to pass on to an upstream engine; a 400 for what cannot be honoured."""
        if request.suffix is not None:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix",
                                      code="unsupported_field")
        extras = request.unhonoured_fields()
        upstream = self.engine.info.engine == "openai"
        refused = sorted(clip(name, 64) for name in extras if not upstream or name in SHAPE_FIELDS)
        if refused:  # names chosen by the client: a few, each clipped
            more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
            raise InvalidRequestError(
                f"unsupported field(s) for /v1/completions: {', '.join(refused[:8])}{more} (n and "
                "best_of may only be 1, logprobs null, the penalties 0)", param=refused[0],
                code="unsupported_field")
        if not upstream:
            return {}
        if "no_repeat_ngram_size" in request.model_fields_set:  # our sampler's: sent when asked for
            extras["no_repeat_ngram_size"] = request.no_repeat_ngram_size
        return extras

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        vocab = self.engine.vocab_size
        bad = next((i for i, token in enumerate(ids) if token < 0 or token >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt[{bad}] is {ids[bad]}, not a token id of this model (ids are 0 to "
                f"{vocab - 1})", param="prompt", code="invalid_token_id")

    async def completion_request(self, request: CompletionRequest) -> tuple[GenerationRequest, str]:
        """The engine's request, and the text ``echo`` puts first ("" without echo)."""
        self.check_model(request.model)
        passthrough = self.completion_extras(request)
        params = self.sampling_params(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            stop=request.stop, seed=request.seed, min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, no_repeat_ngram_size=request.no_repeat_ngram_size)
        prompt, engine = request.prompt, self.engine
        long = len(prompt) >= INLINE_ENCODE_CHARS  # tokenize (or decode) off the event loop
        if isinstance(prompt, str):
            ids = (await asyncio.to_thread(engine.encode, prompt, True) if long
                   else engine.encode(prompt, add_special_tokens=True))
            echo = prompt
        else:
            self.check_prompt_ids(prompt)
            ids = list(prompt)
            echo = "" if not request.echo else (
                await asyncio.to_thread(engine.decode, ids) if long else engine.decode(ids))
        gen = GenerationRequest(prompt_ids=list(ids), params=params, request_id=request_id(),
                                passthrough=passthrough, plain_prompt=True)
        return gen, echo if request.echo else ""

    async def completion(self, request: CompletionRequest) -> CompletionResponse:
        gen, echo = await self.completion_request(request)
        result = await self.complete(gen)
        return CompletionResponse(
            model=self.model_name,
            choices=[CompletionChoice(text=echo + result.text, finish_reason=result.finish_reason)],
            usage=usage(result.prompt_tokens, result.completion_tokens))

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then the SSE ``data:`` lines: the echoed
        prompt (with ``echo``), the text as it comes, the finish reason, the usage if asked."""
        gen, echo = await self.completion_request(request)
        stream = await self.open_stream(gen)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def event(choices: list[CompletionChoice], totals: Usage | None = None) -> str:
            chunk = CompletionStreamResponse(id=ident, created=created, model=self.model_name,
                                             choices=choices, usage=totals)
            return f"data: {chunk.model_dump_json()}\n\n"

        def piece(chunk: GenerationChunk) -> str | None:
            if not (chunk.text or chunk.finished):
                return None
            return event([CompletionChoice(
                text=chunk.text, finish_reason=chunk.finish_reason if chunk.finished else None)])

        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return sse_relay(stream, [event([CompletionChoice(text=echo)])] if echo else [], piece,
                         (lambda totals: event([], totals)) if include_usage else None)
