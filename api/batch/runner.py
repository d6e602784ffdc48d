"""Run many requests through one :class:`~api.serving.Serving`, in-process.

The engine batches whatever requests are in flight together, so throughput comes from keeping
about ``max_batch_size`` of them in flight all the time: a semaphore admits the next row as soon
as one finishes. Rows are pulled from the iterator only when a slot is free, so a 100,000-row
file costs the memory of the rows in flight, not of the file.

Every finished row goes to ``sink.write`` at once (the CLI's sinks append and flush), so an
interruption loses only the rows in flight. Cancelling ``run_batch`` cancels those rows; each
one's stream is closed by :meth:`Serving.complete`, which aborts its generation in the engine.
The Gradio UI can call :func:`run_batch` with its own sink and progress callback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from api.batch.formats import BatchRow, RowResult
from api.errors import error_content
from api.protocol_summarize import SummarizeRequest

if TYPE_CHECKING:  # the CLI and the UI bring their own
    from api.serving import Serving

# A 429 (the engine's queue full, shared with the API and the UI, or an upstream's) is waited
# out, as its Retry-After says, a few times before it counts as the row's error.
OVERLOAD_RETRIES = 5

ProgressCallback = Callable[[int, "int | None", int], None]  # (done, total, errors)


class Sink(Protocol):
    def write(self, result: RowResult) -> None: ...


class BatchAborted(Exception):
    """The engine can serve no more (its worker died): rows not written stay to be redone."""


@dataclass
class BatchStats:
    total: int | None
    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


async def run_row(serving: "Serving", row: BatchRow) -> RowResult:
    """One row's result: the response, or the status and error body the HTTP API would send."""
    if row.error is not None:
        return RowResult(row, *row.error)
    for attempt in range(OVERLOAD_RETRIES + 1):
        try:
            if isinstance(row.request, SummarizeRequest):
                response = await serving.summarize(row.request)
            else:
                response = await serving.chat_completion(row.request)
            return RowResult(row, 200, response.model_dump(mode="json"))
        except Exception as exc:
            failure = serving.engine.failure()
            if failure is not None:  # not this row's fault: stop, and leave it for a rerun
                raise BatchAborted(failure) from exc
            status, body, headers = error_content(exc)
            if status != 429 or attempt == OVERLOAD_RETRIES:
                return RowResult(row, status, body)
            await asyncio.sleep(_seconds(headers.get("Retry-After")))
    raise AssertionError("unreachable")


def _seconds(retry_after: str | None) -> float:
    try:
        return min(max(float(retry_after or 1), 0.1), 60.0)
    except ValueError:
        return 1.0


async def run_batch(serving: "Serving", rows: Iterable[BatchRow], sink: Sink, concurrency: int,
                    progress_callback: ProgressCallback | None = None, *,
                    total: int | None = None) -> BatchStats:
    """Run ``rows`` with at most ``concurrency`` in flight, writing each result as it finishes.

    ``progress_callback(done, total, errors)`` is called after every row. Raises
    :class:`BatchAborted` when the engine dies, and ``CancelledError`` when cancelled; either
    way the rows in flight are cancelled and only finished rows have been written.
    """
    if total is None and hasattr(rows, "__len__"):
        total = len(rows)  # type: ignore[arg-type]
    stats = BatchStats(total=total)
    slots = asyncio.Semaphore(max(1, concurrency))
    running: set[asyncio.Task] = set()
    failures: list[BaseException] = []

    async def one(row: BatchRow) -> None:
        try:
            result = await run_row(serving, row)
            sink.write(result)
            stats.done += 1
            stats.failed += not result.ok
            if progress_callback is not None:
                progress_callback(stats.done, stats.total, stats.failed)
        finally:
            slots.release()

    def finished(task: asyncio.Task) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())

    try:
        for row in rows:
            await slots.acquire()
            if failures:
                break
            task = asyncio.create_task(one(row))
            running.add(task)
            task.add_done_callback(finished)
        while running and not failures:
            await asyncio.wait(set(running), return_when=asyncio.FIRST_EXCEPTION)
        if failures:
            raise failures[0]
        stats.ended = time.monotonic()
    finally:
        for task in list(running):
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return stats
