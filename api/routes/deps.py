"""Request-scoped access to what the lifespan put on ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from api.engine.tenants import anon_tenant, key_tenant
from api.errors import ClientDisconnectedError
from api.security import client_address
from api.serving import Serving

log = logging.getLogger("thai.api")

T = TypeVar("T")


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


def request_tenant(request: Request) -> str:
    """Whom the engine works for (:mod:`api.engine.tenants`): the API key's label, which
    :class:`api.security.AuthMiddleware` stored after checking the key, else the client's
    address (after the trusted-proxy step)."""
    label = request.scope.get("state", {}).get("client_id")
    return key_tenant(label) if label else anon_tenant(client_address(request.scope))


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (and so its generation) if the client goes away.

    A client that leaves (its timeout, a closed tab) is routine, not a server fault: it
    raises :class:`~api.errors.ClientDisconnectedError`, answered as 499 (nobody reads
    it; ``/metrics`` counts a 4xx) with one info line. Raising ``CancelledError`` here
    once escaped every middleware: uvicorn logged "Exception in ASGI application" with
    a traceback and the metrics counted a 500.
    """
    started = time.monotonic()
    task = asyncio.ensure_future(work)

    async def _watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(_watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=5)  # the generation's clean-up runs first
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: nobody is left to tell
        waited = time.monotonic() - started
        log.info("client disconnected after %.1fs; %s %s cancelled", waited, request.method,
                 request.url.path)
        raise ClientDisconnectedError(waited)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream_response(request: Request, events: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of ``events`` that stops them as soon as the client goes away."""
    return StreamingResponse(close_on_disconnect(request, events), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def close_on_disconnect(request: Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events``, closed when the client disconnects, even while no event is due.

    A long summary sends nothing while a round's pieces are generated (minutes, for a
    long document); a disconnect noticed only at the next send would leave all of them
    running for nobody. The request body has been read by now, so ``receive`` only
    reports the disconnect.
    """
    started = time.monotonic()

    async def _disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _next() -> str | None:
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            return None

    watcher = asyncio.ensure_future(_disconnected())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(_next())
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                log.info("client disconnected after %.1fs; %s %s stream cancelled",
                         time.monotonic() - started, request.method, request.url.path)
                return
            item = step.result()
            step = None
            if item is None:
                return
            yield item
    finally:
        watcher.cancel()
        if step is not None and not step.done():
            step.cancel()  # the events' own clean-up (closing generations) runs in it
            await asyncio.wait({step})
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
