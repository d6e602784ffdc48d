"""OpenAI's legacy text completions (``POST /v1/completions``) as vLLM serves them: a prompt
(a text or its token ids) or a list of them, continued as is (no chat template); each prompt
gets ``n`` choices, indexed prompt by prompt (prompt i's choice j is ``i * n + j``)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from api.engine import GenerationChunk, GenerationRequest, TokenLogprob
from api.errors import InvalidRequestError
from api.protocol import Usage
from api.protocol_text import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    Prompt,
)
from api.serving.common import INLINE_ENCODE_CHARS, ServingBase, sse_relay, usage
from api.serving.logprobs import TokenNames, completion_logprobs, prompt_logprobs


@dataclasses.dataclass
class PromptPlan:
    """One prompt of a request: its engine requests (``n``), and the text ``echo`` puts
    first ("" without echo)."""

    gens: list[GenerationRequest]
    echo: str


def _top(entries: Sequence[TokenLogprob | None], k: int | None) -> list[TokenLogprob | None]:
    """The entries with at most ``k`` alternatives each (echo's logprobs and prompt_logprobs
    share one engine computation, made with the larger of the two)."""
    return [e if e is None or k is None or len(e.top) <= k
            else TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in entries]


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
            "n": request.n > 1, "logprobs": request.logprobs is not None,
            "prompt_logprobs": request.prompt_logprobs is not None,
            "return_token_ids": bool(request.return_token_ids)})
        sequences = len(request.prompts()) * request.n
        if sequences > MAX_PROMPTS:
            raise InvalidRequestError(f"{len(request.prompts())} prompts x n {request.n} is "
                                      f"{sequences} sequences; at most {MAX_PROMPTS} per request",
                                      param="n", code="output_too_large")

    def check_prompt_ids(self, ids: Sequence[int]) -> None:
        vocab = self.engine.vocab_size
        bad = next((i for i, token in enumerate(ids) if token < 0 or token >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt[{bad}] is {ids[bad]}, not a token id of this model (ids are 0 to "
                f"{vocab - 1})", param="prompt", code="invalid_token_id")

    async def _prompt_ids(self, prompt: Prompt, echo: bool) -> tuple[list[int], str]:
        """A prompt's ids, and its text for ``echo`` (tokenized or decoded off the event loop
        when long)."""
        engine = self.engine
        long = len(prompt) >= INLINE_ENCODE_CHARS
        if isinstance(prompt, str):
            ids = (await asyncio.to_thread(engine.encode, prompt, True) if long
                   else engine.encode(prompt, add_special_tokens=True))
            return ids, prompt
        self.check_prompt_ids(prompt)
        ids = list(prompt)
        text = "" if not echo else (
            await asyncio.to_thread(engine.decode, ids) if long else engine.decode(ids))
        return ids, text

    async def completion_request(self, request: CompletionRequest, tenant: str | None = None
                                 ) -> list[PromptPlan]:
        """The engine's requests, prompt by prompt (``n`` each, for ``tenant``)."""
        self.check_model(request.model)
        self.check_completion_fields(request)
        prompts = request.prompts()
        echo_logprobs = request.logprobs if (request.echo and request.logprobs is not None) else None
        wanted = [k for k in (echo_logprobs, request.prompt_logprobs) if k is not None]
        engine_prompt_logprobs = max(wanted) if wanted else None
        plans = []
        for number, prompt in enumerate(prompts):
            ids, text = await self._prompt_ids(prompt, request.echo)
            if request.truncate_prompt_tokens is not None:
                ids = self.truncate_prompt(ids, request.truncate_prompt_tokens)
                if request.echo:  # echo shows the prompt the model continued
                    text = self.engine.decode(ids)
            self.check_prompt_logprobs(len(ids), engine_prompt_logprobs,
                                       "echo" if request.prompt_logprobs is None else "prompt_logprobs")
            params = await self.openai_params(
                request, prompt_tokens=len(ids), max_tokens=request.max_tokens,
                no_repeat_ngram_size=request.no_repeat_ngram_size, logprobs=request.logprobs,
                prompt_logprobs=engine_prompt_logprobs, sequences=len(prompts) * request.n)
            gens = self.choice_requests(request.n, ids, params, plain_prompt=True,
                                        passthrough=request.passthrough_fields(),
                                        tenant=self.tenant(tenant), priority=request.priority,
                                        model=self.engine_model(request.model))
            if len(prompts) > 1:
                gens = [dataclasses.replace(g, request_id=f"{g.request_id}-p{number}") for g in gens]
            plans.append(PromptPlan(gens, text if request.echo else ""))
        return plans

    async def completion(self, request: CompletionRequest,
                         tenant: str | None = None) -> CompletionResponse:
        plans = await self.completion_request(request, tenant)
        gens = [gen for plan in plans for gen in plan.gens]
        results = await self.complete_all(gens)
        names = TokenNames(self.engine)
        choices = []
        echo_logprobs = request.echo and request.logprobs is not None
        for index, (gen, result) in enumerate(zip(gens, results)):
            echo = plans[index // request.n].echo
            entries = result.prompt_logprobs or ()
            logprobs = None
            if request.logprobs is not None:
                logprobs = completion_logprobs(
                    names, result.logprobs, prompt_ids=gen.prompt_ids if echo_logprobs else (),
                    prompt_entries=_top(entries, request.logprobs) if echo_logprobs else (),
                    offset=0 if echo_logprobs else len(echo))
            choices.append(CompletionChoice(
                index=index, text=echo + result.text, finish_reason=result.finish_reason,
                logprobs=logprobs,
                prompt_logprobs=(prompt_logprobs(names, gen.prompt_ids,
                                                 _top(entries, request.prompt_logprobs))
                                 if request.prompt_logprobs is not None else None),
                prompt_token_ids=list(gen.prompt_ids) if request.return_token_ids else None,
                token_ids=result.token_ids if request.return_token_ids else None))
        prompt_tokens = sum(results[i * request.n].prompt_tokens for i in range(len(plans)))
        return CompletionResponse(
            model=gens[0].model or self.model_name, choices=choices,
            usage=usage(prompt_tokens, sum(r.completion_tokens for r in results)))

    async def completion_stream(self, request: CompletionRequest,
                                tenant: str | None = None) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then the SSE ``data:`` lines: the echoed
        prompt (with ``echo``), the text as it comes, the finish reason, the usage if asked."""
        plans = await self.completion_request(request, tenant)
        gens = [gen for plan in plans for gen in plan.gens]
        echoes = [plans[i // request.n].echo for i in range(len(gens))]
        streams = await self.open_streams(gens)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        names = TokenNames(self.engine)
        offsets = [len(echo) for echo in echoes]
        token_ids = bool(request.return_token_ids)
        first = [True] * len(gens)  # prompt_token_ids go on a choice's first chunk

        def event(choices: list[CompletionChoice], totals: Usage | None = None) -> str:
            chunk = CompletionStreamResponse(id=ident, created=created,
                                             model=gens[0].model or self.model_name,
                                             choices=choices, usage=totals)
            return f"data: {chunk.model_dump_json()}\n\n"

        def prompt_ids(index: int) -> list[int] | None:
            if not token_ids or not first[index]:
                return None
            first[index] = False
            return list(gens[index].prompt_ids)

        def piece(index: int, chunk: GenerationChunk, so_far: Usage | None) -> str | None:
            logprobs = None
            if request.logprobs is not None and (chunk.logprobs or chunk.prompt_logprobs):
                prompt = _top(chunk.prompt_logprobs or (), request.logprobs)
                logprobs = completion_logprobs(
                    names, chunk.logprobs, prompt_ids=gens[index].prompt_ids if prompt else (),
                    prompt_entries=prompt, offset=0 if prompt else offsets[index])
                offsets[index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                                  if logprobs.tokens else offsets[index])
            if not (chunk.text or chunk.finished or logprobs or (token_ids and chunk.token_ids)):
                return None
            return event([CompletionChoice(
                index=index, text=chunk.text, logprobs=logprobs,
                finish_reason=chunk.finish_reason if chunk.finished else None,
                prompt_token_ids=prompt_ids(index),
                token_ids=list(chunk.token_ids) if token_ids else None)], so_far)

        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(options and options.continuous_usage_stats)
        head = []
        if any(echoes):
            start = (usage(sum(len(plan.gens[0].prompt_ids) for plan in plans), 0)
                     if continuous else None)
            head = [event([CompletionChoice(index=i, text=echoes[i],
                                            prompt_token_ids=prompt_ids(i))], start)
                    for i in range(len(gens))]
        return sse_relay(streams, head, piece,
                         (lambda totals: event([], totals)) if include_usage else None,
                         continuous_usage=continuous,
                         prompt_of=[i // request.n for i in range(len(gens))])
