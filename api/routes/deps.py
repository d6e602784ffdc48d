"""Request-scoped access to what the lifespan put on ``app.state``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from api.serving import Serving

T = TypeVar("T")


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (and so its generation) if the client goes away."""
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
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
