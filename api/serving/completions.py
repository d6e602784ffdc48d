"""OpenAI's legacy text completions (``POST /v1/completions``) as vLLM serves them: one
prompt per request, a text or its token ids, continued as is (no chat template)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from api.engine import GenerationChunk, GenerationRequest
from api.errors import InvalidRequestError
from api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse, Usage
from api.serving.common import INLINE_ENCODE_CHARS, ServingBase, sse_relay, usage
from api.serving.logprobs import TokenNames, completion_logprobs

# Prompt log probabilities (echo with logprobs) hold prompt x vocabulary floats while the
# prompt is prefilled: the prompt is refused above this many (1 GiB of float32).
MAX_PROMPT_LOGPROB_FLOATS = 2**28


class CompletionServing(ServingBase):
    """``POST /v1/completions``."""

    def check_completion_fields(self, request: CompletionRequest) -> None:
        """A 400 for what cannot be honoured: ``suffix``; unknown fields; with an upstream
        engine, what its text-only relay cannot carry."""
        if request.suffix is not None:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix",
                                      code="unsupported_field")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequestError(f"best_of ({request.best_of}) other than n ({request.n}) is "
                                      "not supported (vLLM's V1 engine dropped it too)",
                                      param="best_of", code="unsupported_field")
        self.check_openai_fields(request, "/v1/completions", {
            "n": request.n > 1, "logprobs": request.logprobs is not None})

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        vocab = self.engine.vocab_size
        bad = next((i for i, token in enumerate(ids) if token < 0 or token >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt[{bad}] is {ids[bad]}, not a token id of this model (ids are 0 to "
                f"{vocab - 1})", param="prompt", code="invalid_token_id")

    async def completion_request(self, request: CompletionRequest, tenant: str | None = None
                                 ) -> tuple[list[GenerationRequest], str]:
        """The engine's requests (one per choice, for ``tenant``), and the text ``echo`` puts
        first ("" without echo)."""
        self.check_model(request.model)
        self.check_completion_fields(request)
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
        prompt_logprobs = request.logprobs if (request.echo and request.logprobs is not None) else None
        if prompt_logprobs is not None and len(ids) * engine.vocab_size > MAX_PROMPT_LOGPROB_FLOATS:
            raise InvalidRequestError(
                f"echo with logprobs is limited to prompts of "
                f"{MAX_PROMPT_LOGPROB_FLOATS // engine.vocab_size} tokens here; this one has "
                f"{len(ids)}", param="echo", code="prompt_too_long_for_logprobs")
        params = await self.openai_params(
            request, prompt_tokens=len(ids), max_tokens=request.max_tokens,
            no_repeat_ngram_size=request.no_repeat_ngram_size, logprobs=request.logprobs,
            prompt_logprobs=prompt_logprobs)
        gens = self.choice_requests(request.n, ids, params, plain_prompt=True,
                                    passthrough=request.passthrough_fields(),
                                    tenant=self.tenant(tenant), priority=request.priority,
                                    model=self.engine_model(request.model))
        return gens, echo if request.echo else ""

    async def completion(self, request: CompletionRequest,
                         tenant: str | None = None) -> CompletionResponse:
        gens, echo = await self.completion_request(request, tenant)
        results = await self.complete_all(gens)
        names = TokenNames(self.engine)
        choices = []
        for index, result in enumerate(results):
            logprobs = None
            if request.logprobs is not None:
                prompt_ids = gens[index].prompt_ids if result.prompt_logprobs is not None else ()
                logprobs = completion_logprobs(
                    names, result.logprobs, prompt_ids=prompt_ids,
                    prompt_entries=result.prompt_logprobs or (),
                    offset=0 if result.prompt_logprobs is not None else len(echo))
            choices.append(CompletionChoice(index=index, text=echo + result.text,
                                            finish_reason=result.finish_reason, logprobs=logprobs))
        return CompletionResponse(
            model=gens[0].model or self.model_name, choices=choices,
            usage=usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results)))

    async def completion_stream(self, request: CompletionRequest,
                                tenant: str | None = None) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then the SSE ``data:`` lines: the echoed
        prompt (with ``echo``), the text as it comes, the finish reason, the usage if asked."""
        gens, echo = await self.completion_request(request, tenant)
        streams = await self.open_streams(gens)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        names = TokenNames(self.engine)
        offsets = [len(echo)] * len(gens)

        def event(choices: list[CompletionChoice], totals: Usage | None = None) -> str:
            chunk = CompletionStreamResponse(id=ident, created=created,
                                             model=gens[0].model or self.model_name,
                                             choices=choices, usage=totals)
            return f"data: {chunk.model_dump_json()}\n\n"

        def piece(index: int, chunk: GenerationChunk) -> str | None:
            logprobs = None
            if request.logprobs is not None and (chunk.logprobs or chunk.prompt_logprobs):
                prompt = chunk.prompt_logprobs or ()
                logprobs = completion_logprobs(
                    names, chunk.logprobs, prompt_ids=gens[index].prompt_ids if prompt else (),
                    prompt_entries=prompt, offset=0 if prompt else offsets[index])
                offsets[index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                  if logprobs.tokens else offsets[index])
            if not (chunk.text or chunk.finished or logprobs):
                return None
            return event([CompletionChoice(
                index=index, text=chunk.text, logprobs=logprobs,
                finish_reason=chunk.finish_reason if chunk.finished else None)])

        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        head = [event([CompletionChoice(index=i, text=echo)]) for i in range(len(gens))] if echo else []
        return sse_relay(streams, head, piece,
                         (lambda totals: event([], totals)) if include_usage else None)
