"""Who may call the server: API keys checked in constant time, and a per-client rate limit.

Keys come from ``THAI_API_KEYS`` and ``THAI_API_KEY_FILE``. When there is at
least one, every route needs ``Authorization: Bearer KEY`` except the probes
(``/health``, ``/ready``), ``/metrics`` when ``THAI_METRICS_PUBLIC`` is set,
and the UI unless ``THAI_PROTECT_UI`` is set. The UI calls the engine
in-process, so leaving it public never opens the API: the ``/v1`` routes need a
key whatever the UI setting. A protected UI accepts the key as the password of
HTTP Basic authentication (any user name), so a browser can ask for it.

Keys are kept only as SHA-256 digests and compared with
:func:`hmac.compare_digest` against every configured digest, so neither the
key's content nor which key matched leaks through timing. Logs and the rate
limiter see a short label (``key-1a2b3c4d``), never the key.

Wrong keys are limited per client address (``THAI_AUTH_FAILURES_PER_MINUTE``,
a token bucket of failures): once an address has spent its budget, every request
from it that needs a key gets 429 with ``Retry-After``, *before* its key is
checked, so guessing costs minutes per ten tries instead of nothing; valid keys
from other addresses are unaffected. The address is the one the trusted-proxy
step (:class:`api.middleware.TrustedProxyMiddleware`) settled on: behind nginx
with ``THAI_FORWARDED_ALLOW_IPS`` the real client, never a forged header.

Both guards are pure ASGI middlewares: they answer or pass the request through
untouched, so streamed responses are never buffered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_body
from api.settings import ServerSettings, SettingsError

PROBE_PATHS = frozenset({"/health", "/ready"})
METRICS_PATH = "/metrics"
# The adapter admin routes check THAI_ADMIN_KEYS themselves (api.routes.lora_admin): an API
# key is not an admin key, and an admin key need not be an API key.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
UI_PREFIX = "/ui"
UI_REALM = 'Basic realm="Thai LLM UI", charset="UTF-8"'

log = logging.getLogger("thai.security")


def route_path(scope: Scope) -> str:
    """The path the app routes on, without the proxy prefix (``root_path``)."""
    path = scope.get("path", "/") or "/"
    root = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def is_ui_path(path: str) -> bool:
    return path == UI_PREFIX or path.startswith(UI_PREFIX + "/")


def key_label(key: str) -> str:
    """A stable, non-reversible name for a key, safe to log."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class APIKeys:
    """The configured keys as digests; :meth:`verify` answers in constant time."""

    def __init__(self, keys: list[str] | tuple[str, ...] | frozenset[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in sorted(set(keys))]

    @classmethod
    def from_settings(cls, server: ServerSettings) -> "APIKeys":
        keys = list(server.api_keys)
        if server.api_key_file:
            keys += read_key_file(Path(server.api_key_file).expanduser())
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def verify(self, candidate: str | None) -> bool:
        """True when ``candidate`` is one of the keys; every digest is compared, always."""
        if not candidate:
            return False
        digest = hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def gradio_auth(self, username: str, password: str) -> bool:
        """Signature of Gradio's ``auth=`` callable: any user name, a key as password."""
        return self.verify(password)


def read_key_file(path: Path) -> list[str]:
    """Keys from a file: one per line, blank lines and ``#`` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"THAI_API_KEY_FILE (--api-key-file): cannot read {path}: "
                            f"{exc.strerror or exc}") from None
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise SettingsError(f"THAI_API_KEY_FILE (--api-key-file): {path} holds no key")
    bad = sum(1 for k in keys if len(k) < 8 or any(c.isspace() for c in k))
    if bad:
        raise SettingsError(f"THAI_API_KEY_FILE (--api-key-file): {bad} key(s) in {path} are "
                            "shorter than 8 characters or contain spaces")
    return keys


def presented_key(headers: list[tuple[bytes, bytes]], *, allow_basic: bool) -> str | None:
    """The key a request carries: ``Bearer KEY``, or (for the UI) Basic ``user:KEY``."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        text = value.decode("latin-1").strip()
        scheme, _, credentials = text.partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and credentials:
            return credentials
        if allow_basic and scheme == "basic" and credentials:
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2] or None
        return None
    return None


def needs_key(path: str, method: str, headers: list[tuple[bytes, bytes]], server: ServerSettings,
              ui_mounted: bool) -> bool:
    """Whether this request must carry a key (assuming keys are configured)."""
    if path in PROBE_PATHS or method == "OPTIONS":  # CORS preflights carry no credentials
        return False
    if path in ADMIN_PATHS:
        return False
    if path == METRICS_PATH:
        return not server.metrics_public
    if is_ui_path(path):
        return server.protect_ui
    if path == "/" and method in ("GET", "HEAD") and ui_mounted and not server.protect_ui:
        # A browser opening the site (a Space embeds "/") is only redirected to the public UI.
        accept = next((v for k, v in headers if k.lower() == b"accept"), b"")
        return b"text/html" not in accept
    return True


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def uses_basic_auth(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the credentials are Basic ones: the kind a browser sends by itself."""
    value = _header(headers, b"authorization")
    return bool(value) and value.partition(" ")[0].lower() == "basic"


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else url.lower()


def _without_default_port(origin_or_host: str, scheme: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return origin_or_host[: -len(default)] if default and origin_or_host.endswith(default) else origin_or_host


def foreign_origin(scope: Scope, allowed_origins: frozenset[str]) -> str | None:
    """The site a browser says a request came from, when it is neither this app's own
    origin nor one of ``allowed_origins``; None when it is, or when nothing says.

    ``Origin`` first (every browser sends it on a cross-site POST); without it,
    ``Sec-Fetch-Site: cross-site``, then the ``Referer``'s origin. The app's own origin
    is its ``Host`` (a trusted proxy's ``X-Forwarded-Host``): a page of this app sends
    an ``Origin`` naming the host it was loaded from.
    """
    headers = scope.get("headers", [])
    claimed = _header(headers, b"origin")
    if claimed is None:
        if (_header(headers, b"sec-fetch-site") or "").lower() == "cross-site":
            return "cross-site"
        referer = _header(headers, b"referer")
        if not referer:
            return None  # not a browser, or one that tells nothing: Basic auth alone decides
        claimed = _origin_of(referer)
    claimed = claimed.lower().rstrip("/")
    if claimed in allowed_origins:
        return None
    scheme, _, netloc = claimed.partition("://")
    if not netloc:
        return claimed or "null"  # "null": a sandboxed frame, a data: URL
    own = _header(headers, b"x-forwarded-host") or _header(headers, b"host") or ""
    own = own.split(",")[0].strip().lower()
    if own and _without_default_port(netloc, scheme) == _without_default_port(own, scheme):
        return None
    return claimed


class AuthMiddleware:
    """Answers 401 in OpenAI's error shape unless the request carries a valid key, and 429
    to an address that sent too many wrong keys (see the module docstring).

    A browser resends cached Basic credentials to the UI with any request, a forged
    cross-site form post included: a state-changing UI request (not GET/HEAD/OPTIONS)
    authenticated by Basic credentials is refused 403 when its origin is not this app's
    own, nor a frame ancestor or CORS origin of the settings (CSRF)."""

    def __init__(self, app: ASGIApp, keys: APIKeys, server: ServerSettings):
        self.app, self.keys, self.server = app, keys, server
        self.trusted_origins = frozenset(
            o.strip().lower().rstrip("/") for o in [*server.frame_ancestors, *server.cors_origins]
            if o.strip() and o.strip() not in ("*", "'self'"))
        per_minute = server.auth_failures_per_minute  # as a burst, then refilled at this rate
        self.failures = TokenBuckets(per_minute, per_minute) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        method = scope.get("method", "GET")
        headers = scope.get("headers", [])
        ui_mounted = bool(getattr(getattr(scope.get("app"), "state", None), "ui_mounted", False))
        if not needs_key(path, method, headers, self.server, ui_mounted):
            await self.app(scope, receive, send)
            return
        ui = is_ui_path(path)
        address = client_address(scope)
        if self.failures is not None:
            wait = self.failures.peek(address)
            if wait > 0:  # before the key is even looked at: a locked-out guesser learns nothing
                await self._locked_out(scope, receive, send, wait)
                return
        key = presented_key(headers, allow_basic=ui)
        if ui and key and method not in SAFE_METHODS and uses_basic_auth(headers):
            site = foreign_origin(scope, self.trusted_origins)
            if site is not None:
                await self._cross_site(scope, receive, send, site)
                return
        if self.keys.verify(key):
            scope.setdefault("state", {})["client_id"] = key_label(key)
            await self.app(scope, receive, send)
            return
        if key and self.failures is not None:  # a wrong key (a missing one is no guess)
            self.failures.take(address)
            if self.failures.peek(address) > 0:
                log.warning("%s sent %g wrong API keys; requests from it that need a key get 429 "
                            "until its budget refills (THAI_AUTH_FAILURES_PER_MINUTE)",
                            address, self.failures.burst)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "API key required"})
            return
        message = ("Invalid API key." if key else
                   "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'.")
        if ui:
            message = "This UI is protected: log in with any user name and an API key as password."
        body = error_body(401, message, "invalid_request_error", None,
                          "invalid_api_key" if key else "missing_api_key")
        challenge = UI_REALM if ui else 'Bearer realm="thai-llm"'
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": challenge})(
            scope, receive, send)

    async def _cross_site(self, scope: Scope, receive: Receive, send: Send, site: str) -> None:
        log.warning("refused a %s to the UI with Basic credentials from another site (%s)",
                    scope.get("method"), site[:200])
        body = error_body(403, "Cross-site request refused: this UI accepts changes only from its "
                          "own pages and the origins in THAI_FRAME_ANCESTORS.",
                          "invalid_request_error", None, "cross_site_request")
        await JSONResponse(body, status_code=403)(scope, receive, send)

    async def _locked_out(self, scope: Scope, receive: Receive, send: Send, wait: float) -> None:
        retry_after = max(1, math.ceil(wait))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "too many wrong API keys"})
            return
        body = error_body(429, f"Too many wrong API keys from this address: at most "
                          f"{self.failures.rate * 60:g} per minute; retry in {retry_after}s.",
                          "rate_limit_error", None, "too_many_auth_failures")
        await JSONResponse(body, status_code=429, headers={"Retry-After": str(retry_after)})(
            scope, receive, send)


class TokenBuckets:
    """One token bucket per client: ``burst`` requests at once, refilled at ``per_minute``.

    At most ``max_clients`` buckets are kept (least recently used dropped), so a
    flood of client addresses cannot grow memory without bound.
    """

    def __init__(self, per_minute: int, burst: int, max_clients: int = 10_000):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds until a token is free."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, client: str, now: float | None = None) -> float:
        """Like :meth:`take` but takes nothing (and stores nothing for an unknown client)."""
        entry = self._buckets.get(client)
        if entry is None:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = entry
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def client_address(scope: Scope) -> str:
    """The client's address (after the trusted-proxy step), for per-address limits."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def client_identity(scope: Scope) -> str:
    """The API key's label when authenticated, else the client address."""
    label = scope.get("state", {}).get("client_id")
    if label:
        return label
    return f"ip-{client_address(scope)}"


def is_rate_limited(path: str, method: str) -> bool:
    """Probes, metrics, CORS preflights and the UI's page and asset loads are not counted."""
    if path in PROBE_PATHS or path == METRICS_PATH or method == "OPTIONS":
        return False
    return not (is_ui_path(path) and method in ("GET", "HEAD"))


class RateLimitMiddleware:
    """429 with ``Retry-After`` when a client exceeds its request rate."""

    def __init__(self, app: ASGIApp, per_minute: int, burst: int):
        self.app = app
        self.buckets = TokenBuckets(per_minute, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_rate_limited(route_path(scope), scope.get("method", "GET")):
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(client_identity(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        body = error_body(429, f"Rate limit exceeded: at most {self.buckets.rate * 60:g} requests "
                          f"per minute (bursts of {self.buckets.burst:g}); retry in {retry_after}s.",
                          "rate_limit_error", None, "rate_limit_exceeded")
        await JSONResponse(body, status_code=429, headers={"Retry-After": str(retry_after)})(
            scope, receive, send)


def document_security(app, server: ServerSettings) -> None:
    """Declare the bearer scheme in the OpenAPI schema, so /docs can send the key."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["APIKey"] = {
            "type": "http", "scheme": "bearer", "description": "An API key from THAI_API_KEYS."}
        components.setdefault("schemas", {})
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if not needs_key(path, method.upper(), [], server, ui_mounted=False):
                    continue
                operation["security"] = [{"APIKey": []}]
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {
                    "description": "Missing or invalid API key",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
                if server.auth_failures_per_minute > 0:
                    responses.setdefault("429", {
                        "description": "Too many wrong API keys from this address",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def install_access_control(app, settings) -> APIKeys:
    """Add the key check and the rate limit (call before CORS, which must run first)."""
    from api.client_limits import install_client_limits  # it imports this module

    server: ServerSettings = settings.server
    install_client_limits(app, settings)  # innermost of the three: it sees which keys were valid
    keys = APIKeys.from_settings(server)
    app.state.api_keys = keys
    if server.rate_limit_per_minute > 0:
        app.add_middleware(RateLimitMiddleware, per_minute=server.rate_limit_per_minute,
                           burst=server.rate_limit_burst)
    if keys.enabled:
        app.add_middleware(AuthMiddleware, keys=keys, server=server)
        document_security(app, server)
    return keys
