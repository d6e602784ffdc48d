"""The batch tab's work: a CSV/XLSX of texts through the engine, bounded for a public page.

:func:`api.batch.run_batch` (the command line's runner) does the rows; this module bounds
what anonymous visitors can make it do:

- **one batch per browser session** at a time (:class:`BatchJobs`, keyed by Gradio's
  session hash), at most ``THAI_UI_BATCH_JOBS_PER_CLIENT`` per client (its address, or its
  key when the UI is protected: a script can invent session hashes, not addresses), and at
  most :data:`MAX_RUNNING_BATCHES` for everyone together;
- **rows**: at most :data:`MAX_ROWS` per file (the command line has no limit);
- **the engine**: every generation of every UI batch, the pieces of a long row included,
  takes one of a few slots shared by all UI batches (:class:`SlotLimitedEngine`): at most
  half the engine's batch width, so chat and summarize users always find room in the batch;
- **stop**: the stop button and leaving the page (Gradio's ``unload``) cancel the rows in
  flight (their generations are aborted in the engine); the rows already finished are still
  written to the result file.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.batch.formats import RowResult
from api.engine.base import GenerationStream

MAX_ROWS = 1000
MAX_RUNNING_BATCHES = 4
RECENT_ROWS = 5  # finished rows named under the batch bar


def batch_slots(max_batch_size: int | None) -> int:
    """Generations all UI batches together may have in flight: half the engine's batch."""
    return max(1, int(max_batch_size or 1) // 2)


# ============================================================ shared slots
class SharedSlots:
    """A semaphore of ``limit`` slots, made for the running event loop (tests run several)."""

    def __init__(self, limit: int | Callable[[], int]):
        self._limit = limit
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.size = 0

    def semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._loop is not loop:
            self.size = self._limit() if callable(self._limit) else self._limit
            self._sem, self._loop = asyncio.Semaphore(max(1, self.size)), loop
        return self._sem


class SlotLimitedEngine:
    """The engine seen through :class:`SharedSlots`: a generation waits for a slot before
    it is admitted, and gives it back when its stream ends or is closed. Everything else is
    the engine's own (a :class:`~api.serving.Serving` built on this works as usual)."""

    def __init__(self, engine: Any, slots: SharedSlots):
        self._engine = engine
        self._slots = slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, request) -> GenerationStream:
        return _SlotStream(self._engine, request, self._slots.semaphore())


class _SlotStream(GenerationStream):
    def __init__(self, engine: Any, request, sem: asyncio.Semaphore):
        self._engine, self._request, self._sem = engine, request, sem
        self._inner: GenerationStream | None = None
        self._held = False
        self._closed = False

    async def _open(self) -> GenerationStream:
        if self._inner is None:
            if self._closed:
                raise StopAsyncIteration
            await self._sem.acquire()
            self._held = True
            try:
                self._inner = self._engine.generate(self._request)  # admission errors raise
            except BaseException:
                self._release()
                raise
        return self._inner

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._sem.release()

    async def wait_open(self) -> None:
        await (await self._open()).wait_open()

    async def __anext__(self):
        inner = await self._open()
        try:
            return await inner.__anext__()
        except BaseException:  # the end, a failure or a cancellation: the slot is free
            self._release()
            raise

    async def aclose(self) -> None:
        self._closed = True
        try:
            if self._inner is not None:
                await self._inner.aclose()
        finally:
            self._release()


# ================================================================ jobs
@dataclass
class BatchJob:
    """One session's batch: what the progress display shows."""

    session: str
    client: str = "-"  # who asked: api.security.client_identity of the request
    total: int = 0
    done: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task | None = None
    stopped: bool = False  # the stop button, or the page was left
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    results: list[RowResult] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.task is None or not self.task.done()

    def write(self, result: RowResult) -> None:  # the runner's sink: kept until the end
        self.results.append(result)

    def progress(self, done: int, total: int | None, errors: int) -> None:
        self.done, self.errors = done, errors
        if total:
            self.total = total
        self.changed.set()

    def stop(self) -> None:
        self.stopped = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.changed.set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finished_rows(self, last: int = RECENT_ROWS) -> list[tuple[str, bool]]:
        """(row label, ok) of the latest finished rows, newest last: rows as they finish."""
        return [(str(r.row.row if r.row.row is not None else r.row.key), r.ok)
                for r in self.results[-last:]]


class BatchBusy(Exception):
    """``"session"``: this session already runs one; ``"client"``: this client (in another
    session) runs as many as it may; ``"server"``: too many run."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope


class BatchJobs:
    """The running batches, by session, bounded per client and in all."""

    def __init__(self, max_running: int = MAX_RUNNING_BATCHES, per_client: int = 1):
        self.max_running = max_running
        self.per_client = max(1, min(per_client, max_running))
        self._jobs: dict[str, BatchJob] = {}

    def start(self, session: str, client: str = "-") -> BatchJob:
        """Register a batch for ``session`` of ``client`` (synchronously: two clicks cannot
        both pass)."""
        current = self._jobs.get(session)
        if current is not None and current.running:
            raise BatchBusy("session")
        running = [job for job in self._jobs.values() if job.running]
        if sum(1 for job in running if job.client == client) >= self.per_client:
            raise BatchBusy("client")
        if len(running) >= self.max_running:
            raise BatchBusy("server")
        job = BatchJob(session, client)
        self._jobs[session] = job
        return job

    def get(self, session: str) -> BatchJob | None:
        return self._jobs.get(session)

    def stop(self, session: str) -> bool:
        job = self._jobs.get(session)
        if job is None or not job.running:
            return False
        job.stop()
        return True

    def finish(self, job: BatchJob) -> None:
        if self._jobs.get(job.session) is job:
            del self._jobs[job.session]

    def running(self) -> int:
        return sum(1 for job in self._jobs.values() if job.running)


# ============================================================ display
def progress_html(state: str, *, done: int = 0, total: int = 0, errors: int = 0,
                  seconds: float | None = None, note: str = "",
                  finished: list[tuple[str, bool]] | None = None) -> str:
    """The batch tab's progress: a bar, one line (Thai then English) and the rows that
    finished last (spreadsheet row numbers, ✓ or ✗)."""
    bar = (f'<progress value="{done}" max="{max(total, 1)}" aria-label="rows done"></progress>'
           if total else "")
    parts = []
    if total:
        parts.append(f"แถวที่เสร็จ / rows done: <b>{done:,}</b> / {total:,}")
        parts.append(f"ผิดพลาด / errors: <b>{errors:,}</b>")
    if seconds is not None:
        parts.append(f"เวลา / time: {seconds:.1f} วินาที / s")
    line = " · ".join(parts)
    label = html.escape(STATE_LABELS.get(state, state))
    note_html = f'<div class="batch-note">{html.escape(note)}</div>' if note else ""
    rows_html = ""
    if finished:
        marks = ", ".join(f"{html.escape(label)} {'✓' if ok else '✗'}" for label, ok in finished)
        rows_html = f'<div class="batch-rows">เสร็จล่าสุด / just finished: แถว / row {marks}</div>'
    return (f'<div class="batch-progress" data-state="{html.escape(state)}" data-done="{done}">'
            f'<div class="batch-state">{label}</div>{bar}'
            f'<div class="batch-line">{line}</div>{rows_html}{note_html}</div>')


STATE_LABELS = {
    "idle": "ยังไม่ได้เริ่ม / not started",
    "reading": "กำลังอ่านไฟล์… / reading the file…",
    "running": "กำลังสรุป… / summarizing…",
    "done": "เสร็จ / done",
    "stopped": "หยุดแล้ว / stopped",
    "failed": "หยุดทำงาน / failed",
}
