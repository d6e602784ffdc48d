"""HTTP guards every response passes through: request ids, body size, headers, privacy.

All are pure ASGI middlewares (not ``BaseHTTPMiddleware``): they look at the
``http.response.start`` message or count ``http.request`` bytes as they pass,
so a streamed response goes out chunk by chunk, never buffered.

- :class:`RequestIdMiddleware` gives every request an id (the client's
  ``X-Request-ID`` when it is sane, else a new one), returns it in the
  ``X-Request-ID`` header and puts it on every log line written while the
  request runs (:class:`RequestIdLogFilter`).
- :class:`BodyLimitMiddleware` answers 413 for bodies over
  ``THAI_MAX_REQUEST_BYTES``: at once from ``Content-Length``, or while
  counting the bytes of a chunked body.
- :class:`SecurityHeadersMiddleware` adds ``X-Content-Type-Options``, a
  ``Referrer-Policy`` and, outside the UI, a Content-Security-Policy (the UI's
  own policy, with its iframe ``frame-ancestors``, is set by the UI module).
- :class:`PromptLogMiddleware`, only with ``THAI_LOG_PROMPTS``, writes request
  and response bodies to the log; without it prompts and outputs never reach
  a log line.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, error_response
from api.security import is_ui_path, route_path

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The id of the request the current task serves; "-" outside any request.
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="-")

# No scripts, no frames, nothing loaded: API responses are data, never pages.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI and ReDoc load FastAPI's pinned assets from jsDelivr and run an inline script.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
            "https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")
DOCS_PATHS = ("/docs", "/redoc")


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` so a log format can show ``%(request_id)s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


def install_request_id_logging(handlers: list[logging.Handler]) -> None:
    """Attach the filter to the given handlers (app.py: the root logger's)."""
    for handler in handlers:
        if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
            handler.addFilter(RequestIdLogFilter())


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _add_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> None:
    """Append headers the app did not set itself."""
    headers = list(message.get("headers", []))
    present = {k.lower() for k, _ in headers}
    headers += [(k, v) for k, v in extra if k not in present]
    message["headers"] = headers


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request_id.set(request_id)

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                _add_headers(message, [(b"x-request-id", request_id.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Answer here rather than in Starlette's outermost handler, so the 500 carries
            # the id, the security headers, and its log line (with traceback) the id too.
            if started or scope["type"] != "http":
                raise
            await error_response(exc)(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
        if not is_ui_path(path):
            csp = DOCS_CSP if path.startswith(DOCS_PATHS) else API_CSP
            extra.append((b"content-security-policy", csp.encode()))
        if path.startswith("/v1/"):  # answers may quote confidential documents
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                _add_headers(message, extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit; FastAPI answers it as 413."""

    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"Request body is larger than this server's limit of {limit} bytes "
                              "(THAI_MAX_REQUEST_BYTES).")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # the server rejects a malformed Content-Length itself
            if too_large:
                await self._reject(scope, receive, send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestTooLarge:  # a route that read the body outside FastAPI's handling
            if started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(self.max_bytes)
        body = error_body(413, error.detail, "invalid_request_error", None, "request_too_large")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


class PromptLogMiddleware:
    """Debug aid (``THAI_LOG_PROMPTS``): logs POST bodies and answers, cut at ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = 65536):
        self.app, self.limit = app, limit
        self.log = logging.getLogger("thai.prompts")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        request_body, response_body = bytearray(), bytearray()

        async def logging_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(request_body) < self.limit:
                request_body.extend(message.get("body", b"")[: self.limit - len(request_body)])
            return message

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.body" and len(response_body) < self.limit:
                response_body.extend(message.get("body", b"")[: self.limit - len(response_body)])
            await send(message)

        try:
            await self.app(scope, logging_receive, logging_send)
        finally:
            self.log.info("%s request: %s", route_path(scope), request_body.decode("utf-8", "replace"))
            self.log.info("%s response: %s", route_path(scope), response_body.decode("utf-8", "replace"))


def install_http_guards(app, settings) -> None:
    """Add the guards outermost-last (call after CORS, so they wrap it)."""
    server = settings.server
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_bytes)
    if server.log_prompts:
        app.add_middleware(PromptLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
