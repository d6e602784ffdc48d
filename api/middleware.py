"""HTTP guards every response passes through: request ids, body size, headers, privacy.

All are pure ASGI middlewares (not ``BaseHTTPMiddleware``): they look at the
``http.response.start`` message or count ``http.request`` bytes as they pass,
so a streamed response goes out chunk by chunk, never buffered.

- :class:`RequestIdMiddleware` gives every request an id (the client's
  ``X-Request-ID`` when it is sane, else a new one), returns it in the
  ``X-Request-ID`` header and puts it on every log line written while the
  request runs (:class:`RequestIdLogFilter`).
- :class:`BodyLimitMiddleware` answers 413 for bodies over
  ``THAI_MAX_REQUEST_BYTES`` (the document upload: ``THAI_DOCUMENT_MAX_BYTES``
  plus the form): at once from ``Content-Length``, or while counting the bytes
  of a chunked body.
- :class:`SecurityHeadersMiddleware` adds ``X-Content-Type-Options``, a
  ``Referrer-Policy`` and, outside the UI, a Content-Security-Policy (the UI's
  own policy, with its iframe ``frame-ancestors``, is set by the UI module).
- :class:`PromptLogMiddleware`, only with ``THAI_LOG_PROMPTS``, writes request
  and response bodies to the log; without it prompts and outputs never reach
  a log line.
- :class:`TrustedProxyMiddleware` (outermost) believes ``X-Forwarded-*`` only
  from the proxies in ``THAI_FORWARDED_ALLOW_IPS`` and strips them from anyone
  else; :class:`RelativeRedirectMiddleware` turns redirects to the request's
  own Host into relative ones, so a forged Host never lands in a ``Location``.

:class:`SafeLogFilter` (installed on the root handlers by app.py) escapes
control characters and cuts every log record, so nothing a client sends can
forge a log line or flood the log, and masks secrets sent in a query string
(``?api_key=...``) before the access log (or anything else) writes them.
What libraries print to stdout/stderr is made into such records too
(:mod:`api.log_streams`).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api.errors import error_body, error_response
from api.security import METRICS_PATH, PROBE_PATHS, is_ui_path, route_path
from api.settings import document_body_limit

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


MAX_LOG_CHARS = 4096  # one log record's message; a traceback keeps its head and tail lines
MAX_TRACEBACK_LINES = 60
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


# A secret in a query string (``?api_key=...``, ``&token=...``, Gradio's ``__sign``): the
# access log writes the whole path, so the value is masked in every record.
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|token|access[_-]?token|auth|authorization|password|passwd|"
    r"secret|sig|signature|__sign)=)[^&#\s\"']*")


def redact_secrets(text: str) -> str:
    """``text`` with the values of secret-looking query parameters replaced by ``***``."""
    return _QUERY_SECRET.sub(r"\1***", text) if "=" in text else text


def safe_log_text(text: str, limit: int = MAX_LOG_CHARS) -> str:
    """``text`` on one line (control characters escaped as ``\\n``, ``\\x1b``...), cut at
    ``limit`` characters with a marker saying how much was left out."""
    cut = len(text) - limit if len(text) > limit else 0
    text = _CONTROL.sub(_escape_char, text[:limit] if cut else text)
    if len(text) > limit:  # escapes made it longer
        cut += len(text) - limit
        text = text[:limit]
    return f"{text}…[{cut} characters cut]" if cut else text


def _safe_traceback(text: str) -> str:
    """A traceback, still on several lines, but each escaped and cut, every one indented (so
    an exception message cannot start a line that looks like a record of its own) and, past
    :data:`MAX_TRACEBACK_LINES`, only its first and last lines kept."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) > MAX_TRACEBACK_LINES:
        head, tail = 10, MAX_TRACEBACK_LINES - 10
        lines = lines[:head] + [f"... {len(lines) - head - tail} traceback lines cut ..."] + lines[-tail:]
    return "\n".join("  " + safe_log_text(line) for line in lines)


class SafeLogFilter(logging.Filter):
    """Makes every record one safe line before any handler formats it.

    Client input reaches log lines (an unknown field's *name*, a path, an exception
    message): a newline in it once forged a whole log line, and a 1.9 MB field name added
    1.9 MB to the log. Here the message is formatted once, escaped and cut at
    :data:`MAX_LOG_CHARS`; tracebacks keep their lines but are escaped, indented and cut.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_thai_safe", False):  # several handlers share the record
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: keep what there is
            message = f"{record.msg!s} {record.args!r}"
        limit = getattr(record, "log_limit", MAX_LOG_CHARS)  # THAI_LOG_PROMPTS asks for more
        record.msg, record.args = safe_log_text(redact_secrets(message), limit), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _safe_traceback(redact_secrets(record.exc_text))
        if record.stack_info:
            record.stack_info = _safe_traceback(record.stack_info)
        record._thai_safe = True
        return True


def install_log_sanitizer(handlers: list[logging.Handler]) -> None:
    """Attach :class:`SafeLogFilter` to the given handlers (app.py: the root logger's)."""
    for handler in handlers:
        if not any(isinstance(f, SafeLogFilter) for f in handler.filters):
            handler.addFilter(SafeLogFilter())


def request_header(scope: Scope, name: bytes) -> bytes | None:
    """The value of the request's first ``name`` header (lower-case bytes), if any."""
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
        given = (request_header(scope, b"x-request-id") or b"").decode("latin-1")
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

    def __init__(self, limit: int, setting: str = "THAI_MAX_REQUEST_BYTES"):
        super().__init__(413, f"Request body is larger than this server's limit of {limit} bytes "
                              f"({setting}).")


# The one route whose body is a file: its limit is api.settings.document_body_limit.
DOCUMENT_UPLOAD_PATH = "/v1/summarize/document"


class BodyLimitMiddleware:
    """413 past ``max_bytes``, or past a path's own limit in ``path_limits``
    (path -> (bytes, the setting to name in the error))."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 path_limits: dict[str, tuple[int, str]] | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.path_limits.get(route_path(scope),
                                                  (self.max_bytes, "THAI_MAX_REQUEST_BYTES"))
        declared = request_header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > max_bytes
            except ValueError:
                too_large = False  # the server rejects a malformed Content-Length itself
            if too_large:
                await receive_error_response(RequestTooLarge(max_bytes, setting))(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise RequestTooLarge(max_bytes, setting)
            return message

        await run_with_guarded_receive(self.app, scope, receive, send, counting_receive,
                                       RequestTooLarge)


def receive_error_response(exc: HTTPException) -> JSONResponse:
    """The answer to an error raised while reading a body (too large, too slow): its status
    and ``code`` in the error envelope, and ``Connection: close`` (the rest is never read)."""
    body = error_body(exc.status_code, exc.detail, "invalid_request_error", None, exc.code)
    return JSONResponse(body, status_code=exc.status_code, headers={"Connection": "close"})


async def run_with_guarded_receive(app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                                   guarded_receive: Receive,
                                   error_type: type[HTTPException]) -> None:
    """Run ``app`` reading its body through ``guarded_receive``, which raises ``error_type``.

    FastAPI answers what its own body parsing raises; one that escapes (a route that read
    the body itself, a mounted app) is answered here, unless the response has started.
    """
    started = False

    async def tracking_send(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, guarded_receive, tracking_send)
    except error_type as exc:
        if started:
            raise
        await receive_error_response(exc)(scope, receive, send)


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
            extra = {"log_limit": self.limit + 256}  # SafeLogFilter would cut at 4 KB
            self.log.info("%s request: %s", route_path(scope), request_body.decode("utf-8", "replace"),
                          extra=extra)
            self.log.info("%s response: %s", route_path(scope),
                          response_body.decode("utf-8", "replace"), extra=extra)


# Headers a reverse proxy sets about the client; from anyone else they are lies.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                                b"x-forwarded-port", b"x-forwarded-prefix", b"forwarded",
                                b"x-real-ip"})
# Gradio takes its page's root URL from this one before anything else; no proxy of ours sets
# it, and nginx passes a client's through: dropped from everyone.
NEVER_BELIEVED = frozenset({b"x-gradio-server"})
_UNTRUSTED_DROP = FORWARDING_HEADERS | NEVER_BELIEVED


class TrustedProxyMiddleware:
    """Believes proxy headers only from the proxies in ``THAI_FORWARDED_ALLOW_IPS``.

    When the direct peer is one of them (``*`` trusts all; networks like ``10.0.0.0/8``
    work), ``X-Forwarded-For`` and ``-Proto`` set the client address and scheme exactly
    as uvicorn's :class:`ProxyHeadersMiddleware` does (it is reused), and
    ``X-Forwarded-Host`` stays for the UI's URLs. From anyone else, every forwarding
    header is removed: uvicorn's own ``proxy_headers`` trusted any loopback client, so a
    local process could pose as another address (escaping the per-address rate limit
    and the wrong-key limit) and any client could set the UI's root URL through
    ``X-Forwarded-Host``. ``X-Gradio-Server`` (the same power) is removed from everyone.
    Installed outermost, so every other guard sees the result.
    """

    def __init__(self, app: ASGIApp, trusted: list[str] | str):
        self.app = app
        self.proxied = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
        self.trusted = self.proxied.trusted_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        trusted = bool(client) and client[0] in self.trusted
        drop = NEVER_BELIEVED if trusted else _UNTRUSTED_DROP
        headers = scope.get("headers") or []
        if any(name.lower() in drop for name, _ in headers):
            scope["headers"] = [(name, value) for name, value in headers if name.lower() not in drop]
        await (self.proxied if trusted else self.app)(scope, receive, send)


class RelativeRedirectMiddleware:
    """Makes a redirect to this server's own host relative: ``Location: /ui/``.

    Starlette builds absolute redirects from the request's Host header (``/ui`` ->
    ``http://HOST/ui/``, ``/docs/`` -> ``http://HOST/docs``), so a forged Host went
    straight into the ``Location`` (and into any cache in front). A relative reference
    means the same to the browser and cannot point elsewhere. Redirects to other
    hosts are left alone.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        own = {f"{scope['server'][0]}:{scope['server'][1]}"} if scope.get("server") else set()
        for name, value in scope.get("headers", []):
            if name.lower() in (b"host", b"x-forwarded-host"):  # X-Forwarded-Host: trusted only
                own.update(h.strip().lower() for h in value.decode("latin-1").split(","))

        async def send_relative(message: Message) -> None:
            if message["type"] == "http.response.start" and 300 <= message.get("status", 200) < 400:
                message["headers"] = [(name, _relative(value, own) if name.lower() == b"location"
                                       else value) for name, value in message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, send_relative)


def _relative(location: bytes, own_hosts: set[str]) -> bytes:
    try:
        parts = urlsplit(location.decode("latin-1"))
    except ValueError:
        return location
    if parts.scheme.lower() not in ("http", "https") or parts.netloc.lower() not in own_hosts:
        return location
    path = "/" + parts.path.lstrip("/")  # "//evil" would be a protocol-relative URL
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return (path + query + fragment).encode("latin-1")


class AllowedHostsMiddleware:
    """``THAI_ALLOWED_HOSTS``: 400 for a request naming a host not in the list.

    The host checked is the one the app builds URLs from: a trusted proxy's
    ``X-Forwarded-Host`` (others were removed already), else ``Host``. An entry is a
    host (any port), a ``host:port``, or ``*.domain`` (its subdomains). Probes and
    ``/metrics`` are exempt: health checks and scrapers often use an address.
    """

    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app = app
        self.hosts = [h.strip().lower() for h in hosts if h.strip()]

    def allowed(self, host: str) -> bool:
        host = host.strip().lower()
        if host.startswith("["):  # [::1]:8001
            name = host.split("]", 1)[0] + "]"
        else:
            name = host.rsplit(":", 1)[0]
        for entry in self.hosts:
            if entry.startswith("*."):
                if name.endswith(entry[1:]):
                    return True
            elif entry in (host, name):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in PROBE_PATHS \
                or route_path(scope) == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        forwarded = request_header(scope, b"x-forwarded-host")
        raw = forwarded if forwarded is not None else request_header(scope, b"host")
        host = (raw or b"").decode("latin-1").split(",")[0]
        if self.allowed(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            return
        body = error_body(400, "This server does not answer to that host name (THAI_ALLOWED_HOSTS).",
                          "invalid_request_error", None, "host_not_allowed")
        await JSONResponse(body, status_code=400, headers={"Connection": "close"})(scope, receive, send)


def install_proxy_guards(app, settings) -> None:
    """Add the redirect rewriter, the host allow-list and, outermost, the trusted-proxy
    step (call last)."""
    app.add_middleware(RelativeRedirectMiddleware)
    if settings.server.allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, hosts=list(settings.server.allowed_hosts))
    app.add_middleware(TrustedProxyMiddleware, trusted=list(settings.server.forwarded_allow_ips))


def install_http_guards(app, settings, upload_paths: tuple[str, ...] = ()) -> None:
    """Add the guards outermost-last (call after CORS, so they wrap it).

    ``upload_paths``: routes besides :data:`DOCUMENT_UPLOAD_PATH` whose bodies are files
    (the UI's upload route), given the document limit instead of THAI_MAX_REQUEST_BYTES.
    """
    server = settings.server
    file_limit = (document_body_limit(server.document_max_bytes),
                  "THAI_DOCUMENT_MAX_BYTES plus 64 KiB for the form")
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_bytes, path_limits={
        path: file_limit for path in (DOCUMENT_UPLOAD_PATH, *upload_paths)})
    if server.log_prompts:
        app.add_middleware(PromptLogMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
