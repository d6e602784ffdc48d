"""Anonymous and UI traffic gets a bounded share of the server, never all of it.

uvicorn's ``limit_concurrency`` (``THAI_MAX_CONNECTIONS``) counts open connections
and running requests together and answers 503 past it, whoever asks. The UI's
Gradio heartbeat (``/ui/gradio_api/heartbeat/<session>``) and its event streams
never end by themselves, so twenty anonymous sockets once made ``/health`` and a
keyed ``/v1/models`` answer 503 on a server with twenty slots. Three bounds:

- **Per connection** (:class:`api.http_protocol.GuardedHttpToolsProtocol`): one
  client address holds at most ``THAI_MAX_CONNECTIONS_PER_CLIENT`` connections.
- **Per request** (:class:`ClientShareMiddleware`, here): requests that are not
  keyed API calls or probes (anonymous ones, and the UI's calls and streams under
  ``/ui/gradio_api/``; its page and static files are not counted) may have at
  most ``THAI_MAX_CONNECTIONS - THAI_RESERVED_CONNECTIONS`` in flight in all (then
  503) and ``THAI_MAX_CONNECTIONS_PER_CLIENT`` per client address (then 429): the
  address is the one the trusted-proxy step settled on, so behind nginx, where every
  connection comes from the proxy, it is still the real visitor. The reserve is
  what keeps keyed API requests and ``/health`` answered.
- **Per stream**: a streamed response to a request without an API key that is
  older than ``THAI_ANONYMOUS_STREAM_MAX_S`` is ended, cleanly (the last chunk is
  sent, the handler cancelled), once anonymous and UI requests fill three
  quarters of their share: abandoned or hostile streams then give their slots to
  newcomers. Not before: Gradio 6.31's page never reopens a heartbeat that ended,
  and Gradio takes its end for a closed tab (its ``unload`` handlers run, which
  cancel the tab's batch), so a quiet server leaves a long batch alone.

Refusals answer with ``Connection: close``: a refused client must not keep an
idle connection, which would still count against ``THAI_MAX_CONNECTIONS``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from api.security import PROBE_PATHS, client_address, is_ui_path, route_path

log = logging.getLogger("thai.http")


UI_CALLS = "/ui/gradio_api/"  # Gradio's calls and streams, the heartbeat among them


def is_uncounted(scope: Scope) -> bool:
    """Probes and keyed API requests (what the reserve is kept for), and the UI's page and
    static files: a browser loading the page over HTTP/2 asks for dozens of script chunks
    at once, each answered at once from a file."""
    path = route_path(scope)
    if path in PROBE_PATHS:
        return True
    if is_ui_path(path):
        return scope.get("method") in ("GET", "HEAD") and not path.startswith(UI_CALLS)
    return bool(scope.get("state", {}).get("client_id"))


PRESSURE_CHECK_S = 1.0  # how often an over-age stream looks whether its slot is wanted


class ClientShareMiddleware:
    """Bounds anonymous and UI requests in flight, in all and per client, and the life of
    anonymous streams (see the module docstring). Pure ASGI: streams stay streams."""

    def __init__(self, app: ASGIApp, *, public_slots: int, per_client: int, stream_max_s: float):
        self.app = app
        self.public_slots, self.per_client, self.stream_max_s = public_slots, per_client, stream_max_s
        self.in_flight = 0
        self.pressure = max(1, public_slots * 3 // 4)  # in flight: over-age streams are ended
        self.per_client_in_flight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_uncounted(scope):
            await self.app(scope, receive, send)
            return
        # The address, not the key: a team sharing one key for the protected UI is many clients.
        client = client_address(scope)
        if self.per_client_in_flight[client] >= self.per_client:
            await self._refuse(scope, receive, send, 429, "rate_limit_error", "too_many_requests_in_flight",
                               f"This client already has {self.per_client} requests in progress, the "
                               "limit per client (THAI_MAX_CONNECTIONS_PER_CLIENT).")
            return
        if self.in_flight >= self.public_slots:
            await self._refuse(scope, receive, send, 503, "service_unavailable", "public_capacity_exhausted",
                               f"The {self.public_slots} connections for anonymous and UI requests are "
                               "all in use (THAI_MAX_CONNECTIONS minus THAI_RESERVED_CONNECTIONS); "
                               "retry shortly.")
            return
        self.in_flight += 1
        self.per_client_in_flight[client] += 1
        try:
            if scope.get("state", {}).get("client_id"):
                await self.app(scope, receive, send)
            else:
                await self._with_stream_deadline(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.per_client_in_flight[client] -= 1
            if self.per_client_in_flight[client] <= 0:
                del self.per_client_in_flight[client]

    async def _with_stream_deadline(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; a streamed response (no Content-Length) still going
        ``stream_max_s`` after it started is ended once the share is under pressure:
        the app is cancelled and the response completed with an empty last chunk."""
        streaming = asyncio.Event()
        started = ended = expired = False
        path = route_path(scope)  # before a mounted app rewrites the scope

        async def guarded_send(message: Message) -> None:
            nonlocal started, ended
            if expired or ended:
                return  # the deadline ended the response: the app's last words are dropped
            if message["type"] == "http.response.start":
                started = True
                if not any(name.lower() == b"content-length" for name, _ in message.get("headers", [])):
                    streaming.set()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        # A plain task, not an anyio task group: a group would wrap what the app raises
        # (a 413 from the body limit, say) in an ExceptionGroup the outer guards miss.
        task = asyncio.current_task()

        async def watchdog() -> None:
            nonlocal expired
            await streaming.wait()
            await asyncio.sleep(self.stream_max_s)
            while not ended and self.in_flight < self.pressure:
                await asyncio.sleep(PRESSURE_CHECK_S)
            if not ended:
                expired = True
                task.cancel()

        dog = asyncio.ensure_future(watchdog())
        try:
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            if not expired:
                raise
        finally:
            dog.cancel()
            if expired:
                task.uncancel()  # our own cancellation, handled: not the server's
        if expired and started and not ended:
            log.info("%s: anonymous stream ended: older than %gs while anonymous and UI requests "
                     "fill their share (THAI_ANONYMOUS_STREAM_MAX_S)", path,
                     self.stream_max_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, kind: str, code: str,
                      message: str) -> None:
        body = error_body(status, message, kind, None, code)
        await JSONResponse(body, status_code=status,
                           headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)


def install_client_limits(app, settings) -> None:
    """Add :class:`ClientShareMiddleware`; call before the key check is added, so that it
    runs inside it and knows which requests carry a valid key."""
    server = settings.server
    app.add_middleware(ClientShareMiddleware,
                       public_slots=server.max_connections - server.reserved_connections,
                       per_client=server.max_connections_per_client,
                       stream_max_s=server.anonymous_stream_max_s)
