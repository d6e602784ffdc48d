"""Request-scoped access to what the lifespan put on ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from api.errors import ClientDisconnectedError
from api.serving import Serving

log = logging.getLogger("thai.api")

T = TypeVar("T")


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


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
