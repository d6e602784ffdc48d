"""Readiness, graceful drain on SIGTERM, and exit when the engine dies.

Liveness (``/health``) says the process answers; readiness (``/ready``) says
it should get traffic: 503 while the model loads, while draining, and once the
engine has failed. Load balancers, Docker and systemd probe them separately.

On SIGTERM (or the first Ctrl-C) :class:`DrainingServer` does not stop
uvicorn at once: it marks the server draining, so new requests get 503 with
``Retry-After`` and ``/ready`` fails, and waits up to ``THAI_DRAIN_TIMEOUT_S``
for the requests already running, streams included, and for the engine's
queue to empty. Only then does uvicorn's own shutdown close the sockets; the
process exits 0. A second Ctrl-C forces the exit.

If the engine's worker dies, readiness fails and (``THAI_EXIT_ON_ENGINE_DEATH``)
the process exits 1 so that systemd's ``Restart=`` or Docker's restart policy
starts a fresh one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import signal
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.engine import Engine, EngineState
from api.errors import error_body
from api.protocol import ReadinessResponse
from api.security import PROBE_PATHS, is_ui_path, route_path
from api.serving import public_failure

log = logging.getLogger("thai.lifecycle")
ENGINE_CHECK_INTERVAL_S = 0.5


class Lifecycle:
    """Drain state and the count of requests in progress (one per app)."""

    def __init__(self, drain_timeout_s: float):
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.drain_deadline = 0.0
        self.in_flight = 0
        self.refused_while_draining = 0

    def begin_drain(self, reason: str) -> None:
        if not self.draining:
            self.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
            log.warning("%s: draining; new requests get 503, waiting up to %gs for %d in flight",
                        reason, self.drain_timeout_s, self.in_flight)

    def drained(self, engine: Engine) -> bool:
        """True once nothing is left to finish, or the drain timeout has passed."""
        running, waiting = engine.stats()
        if self.in_flight == 0 and running == 0 and waiting == 0:
            log.info("drain complete; %d request(s) refused meanwhile", self.refused_while_draining)
            return True
        if time.monotonic() >= self.drain_deadline:
            log.error("drain timeout of %gs passed with %d request(s) in flight and %d generation(s) "
                      "running; stopping anyway", self.drain_timeout_s, self.in_flight, running + waiting)
            return True
        return False


def _counts_as_work(path: str, method: str) -> bool:
    """Probes are instant, and the UI's page loads and event streams stay open for as long as
    a browser tab does; UI generations are waited for through the engine's queue instead."""
    return path not in PROBE_PATHS and not (is_ui_path(path) and method in ("GET", "HEAD"))


class DrainMiddleware:
    """Counts requests in progress; while draining, answers new ones with 503."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle):
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = route_path(scope), scope.get("method", "GET")
        if path in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            self.lifecycle.refused_while_draining += 1
            body = error_body(503, "The server is shutting down; retry on another instance or in "
                              "a few seconds.", "service_unavailable", None, "server_shutting_down")
            await JSONResponse(body, status_code=503, headers={"Retry-After": "5", "Connection": "close"})(
                scope, receive, send)
            return
        counted = _counts_as_work(path, method)
        self.lifecycle.in_flight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= counted


router = APIRouter()


@router.get("/ready", response_model=ReadinessResponse, summary="Readiness probe",
            responses={503: {"model": ReadinessResponse,
                             "description": "Loading, draining or failed: send no traffic"}})
async def ready(request: Request):
    """200 when the model is loaded, the engine alive and the server not draining; else 503."""
    engine: Engine = request.app.state.engine
    lifecycle: Lifecycle = request.app.state.lifecycle
    failure = public_failure(engine)  # anyone may ask: no server paths (the log has them)
    if lifecycle.draining:
        status, reason = "draining", "the server is shutting down"
    elif failure:
        status, reason = "failed", failure
    elif engine.state is EngineState.READY:
        status, reason = "ready", None
    elif engine.state is EngineState.LOADING:
        status, reason = "loading", "the model is loading"
    else:
        status, reason = "stopped", "the engine is stopped"
    body = ReadinessResponse(status=status, reason=reason)
    return JSONResponse(body.model_dump(), status_code=200 if status == "ready" else 503)


async def _watch_engine(app) -> None:
    """Exit (status 1) once the engine's worker has died, so a supervisor restarts us."""
    engine: Engine = app.state.engine
    while True:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        dead = engine.worker_error()
        if dead is None:  # load failures are handled by the server's load watcher
            continue
        failure = f"engine worker died: {dead!r}"
        log.critical("%s; readiness now fails%s", failure,
                     "; exiting so the supervisor restarts the server"
                     if app.state.settings.server.exit_on_engine_death else "")
        if app.state.settings.server.exit_on_engine_death:
            app.state.fatal_error = failure
            hook = getattr(app.state, "shutdown_hook", None)
            if hook is not None:
                hook()
            else:  # not under app.py (e.g. another ASGI server): let it stop us
                signal.raise_signal(signal.SIGTERM)
        return


def install_lifecycle(app, settings) -> Lifecycle:
    """Readiness route, drain middleware and the engine watcher around the app's lifespan."""
    lifecycle = Lifecycle(settings.server.drain_timeout_s)
    app.state.lifecycle = lifecycle
    app.include_router(router, tags=["info"])
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_):
        async with inner(app_) as state:
            watcher = asyncio.create_task(_watch_engine(app_), name="engine-watch")
            try:
                yield state
            finally:
                watcher.cancel()

    app.router.lifespan_context = lifespan
    return lifecycle


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown (see module docstring)."""

    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:
        lifecycle: Lifecycle = self.app.state.lifecycle
        if lifecycle.draining or self.should_exit:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.force_exit = self.should_exit = True
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it after
        # shutdown and the process would die of SIGTERM instead of exiting 0.
        lifecycle.begin_drain(signal.Signals(sig).name)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if sockets and self.started:  # uvicorn names the address only for sockets it bound
            host = self.config.host
            log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                     f"[{host}]" if ":" in host else host, self.config.port)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        lifecycle: Lifecycle = self.app.state.lifecycle
        return lifecycle.draining and lifecycle.drained(self.app.state.engine)


THREAD_JOIN_S = 5.0


def _join_non_daemon_threads(within_s: float,
                             threads: list[threading.Thread] | None = None) -> list[threading.Thread]:
    """Wait (at most ``within_s`` in all) for the non-daemon threads that were told to stop.

    AnyIO's worker threads get their stop message from the event loop's last callbacks
    and end only when the scheduler next runs them, which on a busy machine is after
    uvicorn returns. The interpreter would wait for them anyway; what is still alive
    after the wait is what would really hold the exit. ``threads``: those to consider
    (default: every thread of the process).
    """
    deadline = time.monotonic() + within_s
    left = []
    for thread in threading.enumerate() if threads is None else threads:
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread)
    return left


def release_at_exit() -> tuple[int, list[str]]:
    """After the server has stopped: stop helper processes still alive and let the
    interpreter exit at once.

    What kept the process alive ~10 s after "Finished server process" was the interpreter's
    own teardown: ``finalize_modules`` runs full garbage collections over the ~600,000
    objects that torch, transformers and Gradio keep (about 1 s each on a busy 2-core
    machine). Nothing needs collecting at exit, so the heap is frozen (``gc.freeze``) and
    the collections find nothing to walk. Returns (helper processes stopped, names of the
    non-daemon threads still running after a short join) for the exit log line.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(2)
        if child.is_alive():
            child.kill()
            child.join(2)
    threads = [t.name for t in _join_non_daemon_threads(THREAD_JOIN_S)]
    gc.collect()  # collect what the shutdown freed (closes files and sockets) while cheap
    gc.freeze()
    return len(children), threads
