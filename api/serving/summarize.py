"""Thai summarization, of texts of any length the request allows.

A text that fits one call (at most ``THAI_SUMMARY_CHUNK_TOKENS`` tokens, and its prompt plus
``max_tokens`` inside the context window) is summarized in one call, as before. A longer
one (``strategy: "auto"``, the default) is split on Thai sentence boundaries
(:func:`api.documents.chunking.split_text`), the pieces are summarized concurrently (they
batch together in the engine; at most ``max_batch_size`` at once), and the joined
summaries are summarized the same way, round after round, until one call holds them all:
that last call's text is the summary. ``strategy: "single"`` keeps the one call (a text
that does not fit gets 400 ``context_length_exceeded``).

Everything happens in a :class:`SummaryRun`: admission (validation, tokenization,
splitting, the piece limit and the first generation's admission) finishes before
:meth:`SummarizeServing.start_summary` returns, so its errors are HTTP statuses; then the
run yields events: :class:`~api.protocol_summarize.SummarizeProgress` when a round starts, every
``PROGRESS_EVERY_TOKENS`` tokens its pieces write and as they finish, :class:`~api.protocol_summarize.SummarizeDelta` with the final summary's text as it
is generated, and last the :class:`~api.protocol_summarize.SummarizeResponse`. ``/v1/summarize``
with ``stream: true`` sends them as Server-Sent Events; the UI can iterate them
in-process. Closing the run (or cancelling its reader) stops every generation it has
in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import dataclasses
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Union

from api.documents.chunking import split_text
from api.engine import GenerationRequest, SamplingParams
from api.engine.base import GenerationStream
from api.engine.errors import EngineOverloadedError
from api.engine.tenants import LOCAL_TENANT
from api.errors import InvalidRequestError, error_content
from api.protocol_summarize import (
    DocumentInfo,
    SummarizeDelta,
    SummarizeDocumentResponse,
    SummarizeProgress,
    SummarizeRequest,
    SummarizeResponse,
    SummarizeUsage,
)
from api.serving.common import Completion, ServingBase, request_id
from api.text import is_blank, normalize_text

log = logging.getLogger("thai.serving")

SummaryEvent = Union[SummarizeProgress, SummarizeDelta, SummarizeResponse]
ProgressCallback = Callable[[SummarizeProgress], Any]

MAX_ROUNDS = 8  # each round shrinks the text at least ~4x (see _budgets); 8 is 65,000x
PIECE_MARGIN_TOKENS = 16  # tokens may merge differently where a piece meets the template
MIN_PIECE_TOKENS = 32  # below this the context window is too small to split into
SUMMARY_JOINER = "\n\n"
# A round's pieces report the tokens they have written every this many tokens (counted, not
# timed, so the same text gives the same events): a batch whose pieces all finish on the same
# step still shows progress while they are written.
PROGRESS_EVERY_TOKENS = 16
OVERLOAD_RETRIES = 5  # a later piece that finds the engine's queue full waits and tries again


@dataclass(frozen=True)
class SummaryOptions:
    """What a summary request asks, whether it came as JSON or as form fields."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    model: str | None = None
    strategy: str = "auto"

    @classmethod
    def of(cls, request: Any) -> "SummaryOptions":
        """From a :class:`SummarizeRequest` or a :class:`SummarizeDocumentForm`."""
        return cls(max_tokens=request.max_tokens, temperature=request.temperature,
                   top_p=request.top_p, model=request.model, strategy=request.strategy)


@dataclass
class _Plan:
    """An admitted summary: its text and what its first round will do."""

    text: str
    text_tokens: int
    params: SamplingParams  # the final summary's
    piece_params: SamplingParams  # every other call's (shorter: see _budgets)
    piece_tokens: int  # the most tokens of text one piece may hold
    messages: list[dict[str, str]] | None = None  # the text fits: one call with these ...
    prompt_ids: list[int] | None = None
    pieces: list[str] | None = None  # ... or it is split into these
    document: DocumentInfo | None = None
    tenant: str = LOCAL_TENANT  # whom every call is for (api.engine.tenants)
    model: str | None = None  # the adapter every call runs (GenerationRequest.model)


class SummaryError(InvalidRequestError):
    """A long text that cannot be summarized within the server's limits."""


class SummaryRun:
    """A summary in progress: iterate it for events, the last one the response.

    The work runs in a task of its own, so a reader that stops early (a closed SSE
    stream, a cancelled request) stops it through :meth:`aclose`, which cancels the task
    and waits until every generation it started has been closed.
    """

    _END = object()

    def __init__(self, work: Callable[[Callable[[SummaryEvent], None]], Awaitable[SummarizeResponse]]):
        self._work = work
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._head: object | None = None  # the first event, read by _start
        self._done = False

    async def _start(self) -> None:
        """Run the work until its first event: what fails before it raises here."""
        self._task = asyncio.ensure_future(self._run())
        try:
            first = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(first, _Failure):
            await self.aclose()
            raise first.error
        self._head = first

    async def _run(self) -> None:
        try:
            response = await self._work(self._queue.put_nowait)
            self._queue.put_nowait(response)
        except Exception as exc:  # handed to the reader, who raises it
            self._queue.put_nowait(_Failure(exc))
        self._queue.put_nowait(self._END)

    def __aiter__(self) -> "SummaryRun":
        return self

    async def __anext__(self) -> SummaryEvent:
        if self._done:
            raise StopAsyncIteration
        if self._head is not None:
            item, self._head = self._head, None
            return item
        item = await self._queue.get()
        if item is self._END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    async def aclose(self) -> None:
        """Stop the work (every generation in flight is closed) and wait until it has."""
        self._done = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def response(self, on_progress: ProgressCallback | None = None) -> SummarizeResponse:
        """Read the run to its end and return the response (``on_progress`` sees progress)."""
        try:
            async for event in self:
                if isinstance(event, SummarizeResponse):
                    return event
                if on_progress is not None and isinstance(event, SummarizeProgress):
                    outcome = on_progress(event)
                    if asyncio.iscoroutine(outcome):
                        await outcome
        finally:
            await self.aclose()
        raise RuntimeError("the summary ended without a response")  # pragma: no cover


@dataclass
class _Failure:
    error: BaseException


def sse_event(event: SummaryEvent) -> str:
    """One ``data:`` line of a summary's event stream."""
    if isinstance(event, SummarizeResponse):
        payload = {"object": "summarize.result", **event.model_dump()}
    else:
        payload = event.model_dump()
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def summary_sse(run: SummaryRun) -> AsyncIterator[str]:
    """The run as SSE: its events, an error event if it fails, then ``[DONE]``."""
    try:
        async for event in run:
            yield sse_event(event)
    except Exception as exc:  # mid-stream failure: an error event in the API's envelope
        _, body, _ = error_content(exc)
        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    finally:  # the client left: stop every generation of the run
        await run.aclose()
    yield "data: [DONE]\n\n"


def _split_text(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """The pieces of ``text`` (a module attribute, so tests can split differently)."""
    return split_text(text, max_tokens, count_tokens)


class SummarizeServing(ServingBase):
    """``POST /v1/summarize``, the document route's summary and the UI's summarize tab."""

    # ------------------------------------------------------------ prompts
    def _prompt_messages(self, text: str) -> list[dict[str, str]]:
        messages = []
        if self.settings.summary_system_prompt:
            messages.append({"role": "system", "content": self.settings.summary_system_prompt})
        messages.append({"role": "user", "content": self.settings.summary_prompt.replace("{text}", text)})
        return messages

    def summary_messages(self, text: str) -> list[dict[str, str]]:
        text = normalize_text(text).strip()
        if is_blank(text):
            raise InvalidRequestError("text is empty (only whitespace or invisible characters); "
                                      "send the Thai text to summarize", param="text")
        return self._prompt_messages(text)

    async def summary_request(self, request: SummarizeRequest,
                              tenant: str | None = None) -> GenerationRequest:
        """The one call of a text that fits (the UI streams it itself)."""
        self.check_model(request.model)
        params = self.sampling_params(max_tokens=request.max_tokens,
                                      temperature=request.temperature, top_p=request.top_p)
        messages = self.summary_messages(request.text)
        return GenerationRequest(prompt_ids=await self.encode(messages), params=params,
                                 request_id=request_id(), messages=messages,
                                 tenant=self.tenant(tenant), model=self.engine_model(request.model))

    # --------------------------------------------------------- public API
    async def summarize(self, request: SummarizeRequest, *,
                        on_progress: ProgressCallback | None = None,
                        tenant: str | None = None) -> SummarizeResponse:
        run = await self.summarize_events(request, tenant)
        return await run.response(on_progress)

    async def summarize_events(self, request: SummarizeRequest,
                               tenant: str | None = None) -> SummaryRun:
        """Admit ``request`` (errors raise here) and return its running :class:`SummaryRun`;
        every call it makes is for ``tenant`` (:mod:`api.engine.tenants`)."""
        return await self.start_summary(request.text, SummaryOptions.of(request), tenant=tenant)

    async def summarize_stream(self, request: SummarizeRequest,
                               tenant: str | None = None) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then yield SSE ``data:`` lines."""
        return summary_sse(await self.summarize_events(request, tenant))

    def summary_params(self, options: SummaryOptions) -> SamplingParams:
        """The model check and the final summary's sampling parameters (cheap: run first)."""
        self.check_model(options.model)
        return self.sampling_params(max_tokens=options.max_tokens,
                                    temperature=options.temperature, top_p=options.top_p)

    async def start_summary(self, text: str, options: SummaryOptions, *,
                            document: DocumentInfo | None = None,
                            tenant: str | None = None) -> SummaryRun:
        """Admit a summary of ``text`` and start it; what fails before its first generation
        runs (validation, the piece limit, an engine that is not ready or overloaded)
        raises here."""
        plan = await self._plan(text, options, self.summary_params(options))
        plan.document = document
        plan.tenant = self.tenant(tenant)
        plan.model = self.engine_model(options.model)
        run = SummaryRun(lambda emit: self._produce(plan, emit))
        await run._start()
        return run

    # ---------------------------------------------------------- admission
    async def _plan(self, text: str, options: SummaryOptions, params: SamplingParams) -> _Plan:
        text = normalize_text(text).strip()
        if is_blank(text):
            raise InvalidRequestError("text is empty (only whitespace or invisible characters); "
                                      "send the Thai text to summarize", param="text")
        if options.strategy == "single":  # today's one call; the engine checks the window
            messages = self._prompt_messages(text)
            return _Plan(text, 0, params, params, 0, messages=messages,
                         prompt_ids=await self.encode(messages))
        tokens = await self.count_tokens(text)
        fitting = await self._fitting_prompt(text, tokens, params.max_tokens)
        if fitting is not None:
            return _Plan(text, tokens, params, params, 0, messages=fitting[0], prompt_ids=fitting[1])
        piece_params, piece_tokens = await self._budgets(params)
        limit = self.settings.summary_max_chunks
        if math.ceil(tokens / piece_tokens) + 1 > limit:  # before the cost of splitting it
            raise SummaryError(
                f"This text has {tokens} tokens: at least {math.ceil(tokens / piece_tokens)} "
                f"pieces of at most {piece_tokens}, which with the final summary is more than "
                f"this server's limit of {limit} (THAI_SUMMARY_MAX_CHUNKS); send a shorter text",
                param="text", code="too_many_chunks")
        pieces = await asyncio.to_thread(_split_text, text, piece_tokens, self.engine.count_tokens)
        if len(pieces) + 1 > limit:
            raise SummaryError(
                f"This text splits into {len(pieces)} pieces of at most {piece_tokens} tokens, "
                f"which with the final summary is more than this server's limit of {limit} "
                "(THAI_SUMMARY_MAX_CHUNKS); send a shorter text", param="text",
                code="too_many_chunks")
        expected = _expected_calls(len(pieces), piece_params.max_tokens, piece_tokens)
        if expected > limit:
            raise SummaryError(
                f"This text splits into {len(pieces)} pieces; summarizing them and then their "
                f"summaries may take {expected} calls, more than this server's limit of {limit} "
                "(THAI_SUMMARY_MAX_CHUNKS); send a shorter text", param="text",
                code="too_many_chunks")
        return _Plan(text, tokens, params, piece_params, piece_tokens, pieces=pieces)

    async def _fitting_prompt(self, text: str, tokens: int,
                              max_tokens: int) -> tuple[list[dict[str, str]], list[int]] | None:
        """The messages and prompt of ``text`` when one call can summarize it, else None."""
        if tokens > self.settings.summary_chunk_tokens:
            return None
        messages = self._prompt_messages(text)
        ids = await self.encode(messages)
        if len(ids) + max_tokens > self.engine.info.max_context:
            return None
        return messages, ids

    async def _budgets(self, params: SamplingParams) -> tuple[SamplingParams, int]:
        """Sampling parameters of the piece calls and the most tokens of text per piece.

        A piece's summary may be at most a quarter of what a piece holds (and never longer
        than the final summary), so every round shrinks the text about 4x or more.
        """
        max_context = self.engine.info.max_context
        template = len(await self.encode(self._prompt_messages("")))
        if template + MIN_PIECE_TOKENS + params.max_tokens > max_context:
            raise SummaryError(
                f"max_tokens is {params.max_tokens}, which leaves no room for text in this "
                f"model's context window of {max_context} tokens (the prompt alone takes "
                f"{template}); ask for fewer tokens", param="max_tokens",
                code="context_length_exceeded")
        available = max_context - template - PIECE_MARGIN_TOKENS
        chunk_tokens = self.settings.summary_chunk_tokens
        piece_max_tokens = max(1, min(params.max_tokens, chunk_tokens // 4, available // 5))
        piece_tokens = min(chunk_tokens, available - piece_max_tokens)
        if piece_tokens < MIN_PIECE_TOKENS:
            raise SummaryError(
                f"This model's context window ({max_context} tokens) is too small to split the "
                "text into pieces; send a shorter text", param="text",
                code="context_length_exceeded")
        return dataclasses.replace(params, max_tokens=piece_max_tokens), piece_tokens

    # ---------------------------------------------------------------- work
    async def _produce(self, plan: _Plan, emit: Callable[[SummaryEvent], None]) -> SummarizeResponse:
        prompt_tokens = completion_tokens = chunks = 0
        text, text_tokens = plan.text, plan.text_tokens
        messages, ids, pieces = plan.messages, plan.prompt_ids, plan.pieces
        limit = self.settings.summary_max_chunks
        for round_ in range(1, MAX_ROUNDS + 2):
            if ids is not None:  # the final round: one call, its text streamed
                result = await self._final_call(round_, messages, ids, plan, emit)
                prompt_tokens += result.prompt_tokens
                completion_tokens += result.completion_tokens
                return self._response(plan, result.text.strip(), result.finish_reason,
                                      prompt_tokens, completion_tokens, chunks + 1, round_)
            assert pieces is not None
            if round_ > MAX_ROUNDS:
                break
            if chunks + len(pieces) + 1 > limit:
                raise SummaryError(
                    f"Summarizing this text needs more than this server's limit of {limit} pieces "
                    f"(THAI_SUMMARY_MAX_CHUNKS): round {round_} has {len(pieces)} after "
                    f"{chunks} before it; send a shorter text", param="text",
                    code="too_many_chunks")
            results = await self._summarize_pieces(round_, pieces, plan, emit)
            chunks += len(pieces)
            prompt_tokens += sum(r.prompt_tokens for r in results)
            completion_tokens += sum(r.completion_tokens for r in results)
            joined = SUMMARY_JOINER.join(r.text.strip() for r in results if not is_blank(r.text))
            if is_blank(joined):  # nothing to summarize further
                return self._response(plan, "", "stop", prompt_tokens, completion_tokens,
                                      chunks, round_)
            joined_tokens = await self.count_tokens(joined)
            if joined_tokens >= text_tokens:
                raise SummaryError(
                    f"Round {round_} of the summary did not shorten the text ({text_tokens} "
                    f"tokens in {len(pieces)} pieces became {joined_tokens} tokens of "
                    "summaries); ask for fewer tokens (max_tokens) or raise "
                    "THAI_SUMMARY_CHUNK_TOKENS", param="max_tokens", code="summary_not_shrinking")
            text, text_tokens = joined, joined_tokens
            messages, ids, pieces = None, None, None
            fitting = await self._fitting_prompt(text, text_tokens, plan.params.max_tokens)
            if fitting is not None:
                messages, ids = fitting
            else:
                pieces = await asyncio.to_thread(_split_text, text, plan.piece_tokens,
                                                 self.engine.count_tokens)
        raise SummaryError(
            f"The summary did not fit one call after {MAX_ROUNDS} rounds; ask for fewer tokens "
            "(max_tokens) or send a shorter text", param="text", code="summary_not_shrinking")

    async def _open_retrying(self, gen: GenerationRequest) -> GenerationStream:
        """Admit a call after the summary's first: work is already done for this request,
        so a full queue (429) is waited out a few times instead of failing it all."""
        for attempt in range(OVERLOAD_RETRIES + 1):
            try:
                return await self.open_stream(gen)
            except EngineOverloadedError as exc:
                if attempt == OVERLOAD_RETRIES:
                    raise
                await asyncio.sleep(min(max(float(exc.retry_after), 0.1), 5.0))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _final_call(self, round_: int, messages: list[dict[str, str]], ids: list[int],
                          plan: _Plan, emit: Callable[[SummaryEvent], None]) -> Completion:
        gen = GenerationRequest(prompt_ids=ids, params=plan.params, request_id=request_id(),
                                messages=messages, tenant=plan.tenant, model=plan.model)
        stream = await (self.open_stream(gen) if round_ == 1 else self._open_retrying(gen))
        emit(SummarizeProgress(round=round_, chunks_done=0, chunks_total=1, final=True,
                               tokens_budget=plan.params.max_tokens))
        return await self.collect(stream, lambda text: emit(SummarizeDelta(delta=text)))

    async def _piece_request(self, piece: str, plan: _Plan) -> GenerationRequest:
        messages = self._prompt_messages(piece)
        return GenerationRequest(prompt_ids=await self.encode(messages), params=plan.piece_params,
                                 request_id=request_id(), messages=messages, tenant=plan.tenant,
                                 model=plan.model)

    async def _summarize_pieces(self, round_: int, pieces: list[str], plan: _Plan,
                                emit: Callable[[SummaryEvent], None]) -> list[Completion]:
        """Summarize ``pieces`` concurrently, at most the engine's batch size at once.

        The first piece is admitted before the round is announced, so the first round's
        admission errors (overloaded, not ready) reach the client as a status. If a piece
        fails, or the run is cancelled, every other piece's generation is closed before
        this returns.
        """
        total = len(pieces)
        budget = total * plan.piece_params.max_tokens
        written = shown = 0  # tokens written by the round's pieces; as last reported
        slots = asyncio.Semaphore(max(1, int(self.engine.info.max_batch_size or 1)))
        results: list[Completion | None] = [None] * total
        done = 0
        await slots.acquire()
        try:
            request = await self._piece_request(pieces[0], plan)
            first = await (self.open_stream(request) if round_ == 1 else self._open_retrying(request))
        except BaseException:
            slots.release()
            raise

        def progress() -> None:
            nonlocal shown
            shown = written
            emit(SummarizeProgress(round=round_, chunks_done=done, chunks_total=total, final=False,
                                   tokens_done=written, tokens_budget=budget))

        def wrote(tokens: int) -> None:
            nonlocal written
            before, written = written, written + tokens
            if written // PROGRESS_EVERY_TOKENS > before // PROGRESS_EVERY_TOKENS:
                progress()

        progress()

        async def one(index: int) -> None:
            nonlocal done
            if index == 0:
                try:
                    results[0] = await self.collect(_CountedStream(first, wrote))
                finally:
                    slots.release()
            else:
                async with slots:
                    stream = await self._open_retrying(await self._piece_request(pieces[index], plan))
                    results[index] = await self.collect(_CountedStream(stream, wrote))
            done += 1
            progress()

        tasks = [asyncio.ensure_future(one(i)) for i in range(total)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:  # the first failure, in piece order
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await first.aclose()  # if its task was cancelled before it ran
        return [r for r in results if r is not None]

    def _response(self, plan: _Plan, summary: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, chunks: int, rounds: int) -> SummarizeResponse:
        if rounds > 1:
            log.info("long text summarized: %d tokens, %d calls in %d rounds, %d tokens used",
                     plan.text_tokens, chunks, rounds, prompt_tokens + completion_tokens)
        fields = dict(summary=summary, model=self.model_name, finish_reason=finish_reason,
                      chunks=chunks, rounds=rounds,
                      usage=SummarizeUsage(input_tokens=prompt_tokens,
                                           output_tokens=completion_tokens,
                                           total_tokens=prompt_tokens + completion_tokens))
        if plan.document is not None:
            return SummarizeDocumentResponse(document=plan.document, **fields)
        return SummarizeResponse(**fields)


class _CountedStream(GenerationStream):
    """A piece's stream that reports each chunk's new tokens (its ``completion_tokens`` is
    the running count; kept non-decreasing whatever an upstream reports)."""

    def __init__(self, stream: GenerationStream, on_tokens: Callable[[int], None]):
        self._stream, self._on_tokens, self._seen = stream, on_tokens, 0

    async def __anext__(self):
        chunk = await self._stream.__anext__()
        if chunk.completion_tokens > self._seen:
            new, self._seen = chunk.completion_tokens - self._seen, chunk.completion_tokens
            self._on_tokens(new)
        return chunk

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def wait_open(self) -> None:
        await self._stream.wait_open()


def _expected_calls(pieces: int, summary_tokens: int, piece_tokens: int) -> int:
    """Calls a split text may take when every piece's summary is as long as allowed: each
    later round packs whole summaries (and their joiners) into pieces, then the final call."""
    per_piece = max(1, piece_tokens // (summary_tokens + 2))
    calls = count = pieces
    for _ in range(MAX_ROUNDS):
        if count * (summary_tokens + 2) <= piece_tokens:
            break
        count = math.ceil(count / per_piece)
        calls += count
    return calls + 1
