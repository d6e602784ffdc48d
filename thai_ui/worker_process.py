"""One helper process for work that must not hold the serving process's GIL.

PyThaiNLP's segmenter, ``grapheme`` and the document parsers are pure Python: run in a
thread, a long text or a big PDF starves the event loop and the engine's worker thread of
the interpreter. In a process of its own such work costs a core at most. The process is
started on first use (``spawn``: forking a process that runs the engine's threads is
unsafe), started anew once if it died (killed, out of memory), and stopped by ``close``.
A job that overruns its timeout is killed with its process (waiting less would leave it
running, and every later job behind it). Uploaded files are not read here: they go to the
app's sandboxed pool (:mod:`api.documents.pool`).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from api.log_streams import sanitize_child_output

log = logging.getLogger("thai.ui")


class SpawnedWorker:
    """Runs jobs one at a time in a single spawned process (``what`` names it in the log)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=sanitize_child_output)
            return self._pool

    def _died(self, attempt: int) -> bool:
        """Forget the dead process; True when the job should be tried once more."""
        log.warning("the %s process died; starting a new one", self.what)
        with self._lock:
            self._pool = None
        return attempt == 1

    def _overran(self, pool: ProcessPoolExecutor) -> None:
        """Kill the process of a job past its timeout, so that it stops costing a core and
        the next job gets a fresh process instead of waiting behind it."""
        log.warning("a %s job overran its time; its process is killed", self.what)
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for process in list(getattr(pool, "_processes", {}).values()):  # no public way
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def call(self, job: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``job(*args)`` in the process, waiting (blocking) up to ``timeout`` seconds."""
        for attempt in (1, 2):
            pool = self._executor()
            try:
                return pool.submit(job, *args).result(timeout)
            except BrokenProcessPool:
                if not self._died(attempt):
                    raise
            except TimeoutError:
                self._overran(pool)
                raise
        raise AssertionError("unreachable")

    async def acall(self, job: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """``job(*args)`` in the process, awaited up to ``timeout`` seconds."""
        for attempt in (1, 2):
            pool = self._executor()
            try:
                future = pool.submit(job, *args)
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
            except BrokenProcessPool:
                if not self._died(attempt):
                    raise
            except asyncio.TimeoutError:
                self._overran(pool)
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop the process now: a job still running (nobody waits for it at shutdown) would
        otherwise keep the server from exiting until it ends, its timeout up to a minute."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # no public way
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(1)  # an idle one exits on the shutdown's sentinel
            if process.is_alive():
                process.kill()
                process.join(2)
