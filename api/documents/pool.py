"""A small pool of sandboxed processes that parse untrusted files.

No uploaded document or table is parsed in the serving process: a hostile file (a .docx of
millions of tiny paragraphs, a PDF whose form XObjects fan out) would otherwise cost the
server gigabytes that CPython's allocator never gives back, and hold the interpreter lock
that every stream needs. Here each job runs in one of ``workers`` helper processes, which
at start limit their own address space (``RLIMIT_AS``) and, per job, their CPU seconds
(``RLIMIT_CPU``). A job that overruns its wall-clock time is killed with its process; one
whose process dies (``MemoryError``, ``SIGXCPU``, the kernel's OOM killer) loses it too.
Either way the caller gets a :class:`~api.documents.errors.DocumentLimitError` naming the
limit and its setting, and the next job gets a fresh process: nobody waits on a dead one.

``concurrent.futures.ProcessPoolExecutor`` cannot kill one job (only break the whole pool),
so this is a plain set of ``multiprocessing`` processes, a pipe each, driven by one thread
per process (a ``ThreadPoolExecutor`` of ``workers`` threads, whose queue is the wait line).

Fairness: a client (an API key's label or an address, as the caller says) may have
``jobs_per_client`` files read or waiting at once, and at most ``max_waiting`` files wait in
all; beyond either the caller gets HTTP 429 at once. A client's slot is released when its
job ends, not when the client stops waiting, so disconnecting and retrying cannot stack jobs.

The processes come from multiprocessing's ``forkserver``: one single-threaded process,
spawned on first use, imports the parsers once (:data:`PRELOAD`) and each reader is forked
from it. Forking the serving process itself is unsafe (its threads hold locks a copy would
never release); spawning each reader cost ~1.4 CPU s of imports, paid again for every reader
killed for overrunning its time, so a visitor sending one slow file after another made the
server pay that each time. Forked from the forkserver, a replacement costs milliseconds.

Jobs are module-level functions; they, their arguments, results and exceptions must pickle.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import pickle
import resource
import signal
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from api.documents.errors import DocumentLimitError, ParseBusyError, ParseQueueFullError

log = logging.getLogger("thai.documents.pool")

# imported once by the forkserver (and by a reader before its limits, if it was not)
PRELOAD = ("api.log_streams", "api.documents.extract", "pypdf", "docx", "lxml.etree")
RETIRE_FRACTION = 0.5  # a worker left holding more than this share of its limit is replaced
START_TIMEOUT_S = 120.0  # a new worker's imports, on a busy machine
_OK, _RAISED, _OUT_OF_MEMORY = "ok", "raised", "memory"
_READY = b"ready"


# ============================================================== in the worker process
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_main(conn, memory_bytes: int, cpu_seconds: int) -> None:
    """Take (function, args, kwargs) from the pipe, answer (status, value, retire), forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C stops us via close()
    import importlib

    from api.log_streams import sanitize_child_output

    sanitize_child_output()

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - an optional parser missing
            pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    conn.send_bytes(_READY)  # a job's time counts from here, not from the imports
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if message is None:
            return
        # this job's CPU budget on top of what the process has used (the soft limit may be
        # moved either way below the hard one; SIGXCPU ends the process when it is reached)
        limit = math.ceil(_cpu_seconds()) + cpu_seconds
        if cpu_hard != resource.RLIM_INFINITY:
            limit = min(limit, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (limit, cpu_hard))
        function, args, kwargs = message
        try:
            reply = (_OK, function(*args, **kwargs))
        except MemoryError:
            reply = (_OUT_OF_MEMORY, None)
        except BaseException as exc:  # the job's own error, for the caller to raise
            reply = (_RAISED, exc)
        retire = reply[0] == _OUT_OF_MEMORY or _rss_bytes() > RETIRE_FRACTION * memory_bytes
        try:
            payload = pickle.dumps((*reply, retire), protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            payload = pickle.dumps((_OUT_OF_MEMORY, None, True))
        except Exception as exc:  # an unpicklable result or exception
            payload = pickle.dumps((_RAISED, RuntimeError(f"unpicklable job result: {exc!r}"),
                                    retire))
        del reply
        try:
            conn.send_bytes(payload)
        except (OSError, ValueError):
            return
        if retire:
            return


# ============================================================== in the server
def reader_context() -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context, its server preloading this module and the parsers.

    The forkserver is one per process (multiprocessing's own); this pool is its only user
    in the server, so the preload list is this module's. It takes effect when the server
    starts, at the first reader. Where there is no forkserver (Windows), each reader is
    spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *PRELOAD])
    return context


class _Worker:
    """One reader process (forked by the forkserver) and the parent's end of its pipe."""

    def __init__(self, context, memory_bytes: int, cpu_seconds: int) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, memory_bytes, cpu_seconds),
                                       name="thai-parse", daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self) -> None:
        """Block until the process has imported the parsers and set its limits."""
        try:
            if self.conn.poll(START_TIMEOUT_S) and self.conn.recv_bytes() == _READY:
                return
        except (EOFError, OSError):
            pass
        exitcode = self.kill()
        raise RuntimeError(f"a document reader process did not start (exit code {exitcode})")

    def kill(self) -> int | None:
        """Kill the process (if it still runs) and return its exit code."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()
        return self.process.exitcode

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(1)
        self.kill()


class ParsePool:
    """Runs parse jobs in ``workers`` sandboxed processes (see the module documentation)."""

    def __init__(self, *, workers: int = 2, memory_mb: int = 1024, timeout_s: float = 60.0,
                 jobs_per_client: int = 1, max_waiting: int = 32) -> None:
        self.workers = workers
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.jobs_per_client = jobs_per_client
        self.max_waiting = max_waiting
        self._context = reader_context()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thai-parse")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._jobs: Counter[str] = Counter()  # client -> jobs running or waiting
        self._in_flight = 0
        self._closed = False

    @classmethod
    def from_settings(cls, server) -> "ParsePool":
        """From :class:`api.settings.ServerSettings`' ``parse_*`` fields."""
        return cls(workers=server.parse_workers, memory_mb=server.parse_memory_mb,
                   timeout_s=server.parse_timeout_s, jobs_per_client=server.parse_jobs_per_client,
                   max_waiting=server.parse_max_waiting)

    # ---------------------------------------------------------------- admission
    def submit(self, client: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue ``function(*args, **kwargs)`` for ``client``, or raise the 429 that says why not."""
        with self._lock:
            if self._closed:
                raise ParseQueueFullError("The server is shutting down; try again shortly.")
            if self._jobs[client] >= self.jobs_per_client:
                raise ParseBusyError(
                    f"This client already has {self._jobs[client]} file(s) being read; at most "
                    f"{self.jobs_per_client} at once (THAI_PARSE_JOBS_PER_CLIENT). Wait for it "
                    "to finish.")
            if self._in_flight >= self.workers + self.max_waiting:
                raise ParseQueueFullError(
                    f"Every document reader is busy and {self.max_waiting} files are waiting "
                    "(THAI_PARSE_WORKERS, THAI_PARSE_MAX_WAITING); try again shortly.")
            self._jobs[client] += 1
            self._in_flight += 1
        try:
            future = self._executor.submit(self._run_for, client, function, args, kwargs)
        except BaseException:
            self._release(client)
            raise
        # a job cancelled while it waited (its caller went away) never runs to free its slot
        future.add_done_callback(lambda done: self._release(client) if done.cancelled() else None)
        return future

    def _run_for(self, client: str, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run the job, then free the client's slot before its result is visible: a client
        that reads a result and at once sends its next file must not find itself busy (a
        future's done-callbacks run only after its waiters are woken)."""
        try:
            return self._run(function, args, kwargs)
        finally:
            self._release(client)

    def _release(self, client: str) -> None:
        with self._lock:
            self._in_flight -= 1
            self._jobs[client] -= 1
            if self._jobs[client] <= 0:
                del self._jobs[client]

    async def run(self, client: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in a worker, awaited; its exception raises here."""
        return await asyncio.wrap_future(self.submit(client, function, *args, **kwargs))

    def call(self, client: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As :meth:`run`, blocking."""
        return self.submit(client, function, *args, **kwargs).result()

    def jobs_of(self, client: str) -> int:
        with self._lock:
            return self._jobs.get(client, 0)

    # ---------------------------------------------------------------- one job
    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ParseQueueFullError("The server is shutting down; try again shortly.")
            worker = self._idle.pop() if self._idle else None
        if worker is None or not worker.process.is_alive():
            if worker is not None:
                worker.kill()
            worker = _Worker(self._context, self.memory_mb * 1024 * 1024, math.ceil(self.timeout_s))
            worker.wait_ready()
        with self._lock:
            self._busy.add(worker)
        return worker

    def _give_back(self, worker: _Worker, *, keep: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
            if keep and not self._closed:
                self._idle.append(worker)
                return
        worker.kill()

    def _run(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """In a pool thread: one job in one worker, which is killed if the job overruns."""
        worker = self._take()
        keep = False
        try:
            try:
                worker.conn.send((function, args, kwargs))
            except (OSError, ValueError):  # died while idle: a fresh one, once
                worker.kill()
                with self._lock:
                    self._busy.discard(worker)
                worker = self._take()
                worker.conn.send((function, args, kwargs))
            if not worker.conn.poll(self.timeout_s):
                worker.kill()
                log.warning("a document took over %.0f s to read; its process was killed",
                            self.timeout_s)
                raise DocumentLimitError(
                    f"Reading the file took over {self.timeout_s:g} s, this server's limit "
                    "(THAI_PARSE_TIMEOUT_S); it was stopped.")
            try:
                status, value, retire = pickle.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):
                raise self._death(worker.kill()) from None
            if status == _OUT_OF_MEMORY:
                raise self._memory_error()
            keep = not retire
            if status == _RAISED:
                raise value
            return value
        finally:
            self._give_back(worker, keep=keep)

    def _memory_error(self) -> DocumentLimitError:
        log.warning("a document needed more than %d MiB to read; its process was replaced",
                    self.memory_mb)
        return DocumentLimitError(
            f"Reading the file needed more than {self.memory_mb} MiB of memory, this server's "
            "limit (THAI_PARSE_MEMORY_MB); it was stopped.")

    def _death(self, exitcode: int | None) -> DocumentLimitError:
        if exitcode == -signal.SIGXCPU:
            log.warning("a document used over %.0f CPU seconds; its process was killed", self.timeout_s)
            return DocumentLimitError(
                f"Reading the file used over {math.ceil(self.timeout_s)} s of CPU, this server's "
                "limit (THAI_PARSE_TIMEOUT_S); it was stopped.")
        if exitcode == -signal.SIGKILL:  # the kernel's OOM killer, most likely
            return self._memory_error()
        log.warning("a document reader died (exit code %s); it was replaced", exitcode)
        return DocumentLimitError(f"The document reader stopped while reading the file (exit "
                                  f"code {exitcode}); it was replaced.")

    # ---------------------------------------------------------------- life
    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        with self._lock:
            return [w.process.pid for w in (*self._idle, *self._busy) if w.process.pid]

    def close(self) -> None:
        """Stop every worker (a running job's caller gets an error) and the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in idle:
            worker.stop()
        for worker in busy:
            worker.kill()
