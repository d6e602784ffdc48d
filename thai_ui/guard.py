"""The UI's front door: what of the mounted Gradio app an outsider may reach, and how often.

The UI is public by design (a Space, an iframe on a portal), so every route
Gradio mounts under ``/ui`` is reachable by anyone. Gradio 6.31 mounted with
``gr.mount_gradio_app`` leaves much of that open (see ``thai_ui/mount.py`` for
the file-check bug itself); this pure ASGI wrapper sits between the mount and
Gradio and closes it in one place:

- **Routes**: only the routes the page and ``gradio_client`` use are passed on
  (:data:`GET_ROUTES`, :data:`POST_ROUTES`); monitoring, profiling, run
  history, vibe editing, proxies, login forms and the rest answer 404.
- **Functions**: an event may name (``fn_index``) only functions that run on
  the server; by name (``/call/<name>``, ``/run/<name>``) only the public API
  (:data:`PUBLIC_API`: ``summarize``, ``summarize_file``, ``chat``). The page's helper
  functions (the file upload's text extraction, the batch tab's run and stop, the
  counters) stay callable by index, because the page itself calls them that way. A
  function published under any other name is a startup error: exposing one is a
  decision made here, not a side effect of an ``api_name``.
- **Files**: a client may name a file only inside this process's upload
  folder (:class:`~thai_ui.uploads.UploadStore`): every ``"path"`` in an event's
  JSON is checked (and mapped from its ``upload/...`` token back to the real
  path) before Gradio reads it, chat messages may be text and files only (a
  component message's ``constructor_args`` would name files Gradio copies
  unchecked), and ``file=`` serves only from there, with a
  fixed set of response headers (Gradio's ranged responses copy the
  *request's* headers, ``Authorization`` and ``Cookie`` included, into the
  response).
- **Uploads**: ``Content-Length`` is required (411) and checked against the
  client's share (429, per address or key) and the whole quota (507) before a
  byte is written (the app's body limit has already answered 413 from it); the
  files are recorded as the client's, and the paths Gradio answers with are
  rewritten to tokens.
- **Cost**: every call (a POST) takes a token from the caller's bucket
  (per address, or per key when the UI is protected); an empty bucket is 429.
  Event payloads are parsed here with a depth limit, so a deeply nested body
  is a 400, not a ``RecursionError`` inside Gradio.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from api.middleware import request_header
from api.security import TokenBuckets, client_identity, route_path
from thai_ui.uploads import TOKEN_PREFIX, UploadStore

log = logging.getLogger("thai.ui.guard")

API = "/gradio_api"
# Exact paths and path prefixes (ending in "/" or "=") the page and gradio_client use.
GET_ROUTES = ("/", "/config", "/config/", "/theme.css", "/favicon.ico", "/robots.txt",
              "/manifest.json", "/static/", "/assets/", "/svelte/",
              f"{API}/info", f"{API}/info/", f"{API}/queue/data", f"{API}/heartbeat/",
              f"{API}/file=", f"{API}/upload_progress", f"{API}/call/", f"{API}/app_id",
              f"{API}/app_id/", f"{API}/startup-events", f"{API}/theme.css")
POST_ROUTES = (f"{API}/queue/join", f"{API}/run/", f"{API}/api/", f"{API}/call/",
               f"{API}/cancel", f"{API}/reset", f"{API}/reset/", f"{API}/upload")
# Headers a file response may carry (Gradio's own set, without echoed request headers).
FILE_RESPONSE_HEADERS = frozenset({b"content-type", b"content-length", b"content-range",
                                   b"accept-ranges", b"content-disposition", b"last-modified",
                                   b"etag", b"content-encoding", b"vary"})
# GET routes whose bodies carry event results (and so may name uploaded files).
STREAMED_RESULTS = (f"{API}/queue/data", f"{API}/call/")
# The only functions gradio_client (or anyone) may call by name. Adding one here is the
# deliberate step: an event published with another api_name stops the app from starting.
PUBLIC_API = frozenset({"summarize", "summarize_file", "chat"})
NAMED_CALL = re.compile(rf"^{API}/(?:call(?:/v2)?|run|api)/([^/]+)/?$")
MAX_JSON_DEPTH = 64


def _allowed(path: str, routes: Iterable[str]) -> bool:
    return any(path == r or (r.endswith(("/", "=")) and r != "/" and path.startswith(r))
               for r in routes)


class RefusedRequest(Exception):
    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def refusal_response(exc: RefusedRequest) -> JSONResponse:
    """The project's error envelope plus Gradio's ``detail``, which its clients show."""
    error_type = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
    body = {**error_body(exc.status, exc.message, error_type, None, exc.code), "detail": exc.message}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


class FunctionPolicy:
    """Which Gradio functions a request may name: by index any with server code, by name the public API."""

    def __init__(self, blocks: Any, allowed: frozenset[str] = PUBLIC_API):
        self.callable_ids = frozenset(fid for fid, fn in blocks.fns.items() if fn.fn is not None)
        self.public_names = frozenset(fn.api_name for fn in blocks.fns.values()
                                      if fn.fn is not None and fn.api_visibility == "public")
        unlisted = self.public_names - allowed
        if unlisted:
            raise RuntimeError(f"UI functions published by name but not in thai_ui.guard."
                               f"PUBLIC_API: {', '.join(sorted(unlisted))}; make them private "
                               "(api_visibility='private') or list them deliberately")

    def check(self, path: str, body: Any) -> None:
        fn_index = body.get("fn_index") if isinstance(body, dict) else None
        if fn_index is not None:
            if isinstance(fn_index, bool) or not isinstance(fn_index, int) \
                    or fn_index not in self.callable_ids:
                raise RefusedRequest(404, "No such function.", "function_not_found")
            return
        named = NAMED_CALL.match(path)
        if named and named.group(1) not in self.public_names:
            raise RefusedRequest(404, "No such API endpoint.", "function_not_found")
        if path == f"{API}/queue/join":
            raise RefusedRequest(400, "fn_index is required.", "invalid_request")


class UIGuard:
    def __init__(self, app: ASGIApp, *, uploads: UploadStore, functions: FunctionPolicy,
                 per_minute: int, burst: int):
        self.app = app
        self.uploads = uploads
        self.functions = functions
        self.buckets = TokenBuckets(per_minute, burst) if per_minute > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # Gradio 6 serves no websocket; lifespan passes
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        method = scope.get("method", "GET")
        try:
            if method in ("GET", "HEAD"):
                if not _allowed(path, GET_ROUTES):
                    raise RefusedRequest(404, "Not found.", "not_found")
                if path.startswith(f"{API}/file="):
                    await self._file(scope, receive, send, path)
                    return
                if path.startswith(STREAMED_RESULTS):
                    send = self._hiding_paths(send)
                await self.app(scope, receive, send)
                return
            if method != "POST" or not _allowed(path, POST_ROUTES):
                raise RefusedRequest(404 if method in ("POST", "OPTIONS") else 405,
                                     "Not found.", "not_found")
            self._take_token(scope)
            if path == f"{API}/upload":
                await self._upload(scope, receive, send)
                return
            await self._event(scope, receive, send, path)
        except RefusedRequest as exc:
            await refusal_response(exc)(scope, receive, send)

    # ----------------------------------------------------------- rate limit
    def _take_token(self, scope: Scope) -> None:
        if self.buckets is None:
            return
        wait = self.buckets.take("ui-" + client_identity(scope))
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise RefusedRequest(
                429, f"Too many UI requests: at most {self.buckets.rate * 60:g} per minute "
                f"(bursts of {self.buckets.burst:g}); retry in {retry}s.", "rate_limit_exceeded",
                {"Retry-After": str(retry)})

    # --------------------------------------------------------------- events
    async def _event(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        raw = await _read_body(receive)
        body = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise RefusedRequest(400, "The request body is not valid JSON.", "invalid_json") from None
        if body is not None:
            _check_depth(body)
            self.functions.check(path, body)
            body = self._map_files(body)
            raw = json.dumps(body, ensure_ascii=False).encode()
        await self.app(_with_body_length(scope, len(raw)), _replay(raw, receive),
                       self._hiding_paths(send))

    def _hiding_paths(self, send: Send) -> Send:
        """Outputs name uploaded files by token: the upload folder's path never leaves.

        Bodies are rewritten as they stream (event results and the queue's SSE);
        only a chunk's tail that could begin the folder's path is held back.
        """
        needle = (str(self.uploads.dir) + "/").encode()
        token = TOKEN_PREFIX.encode()
        held = b""
        started: Message | None = None

        async def rewriting_send(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if k.lower() != b"content-length"]}
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            if started is not None:  # sent with the first body: content-length is gone
                await send(started)
                started = None
            data = (held + message.get("body", b"")).replace(needle, token)
            more = message.get("more_body", False)
            held = b""
            if more:
                keep = next((n for n in range(min(len(needle) - 1, len(data)), 0, -1)
                             if needle.startswith(data[-n:])), 0)
                if keep:
                    data, held = data[:-keep], data[-keep:]
            await send({**message, "body": data})

        return rewriting_send

    def _map_files(self, value: Any) -> Any:
        """Every ``{"path": ...}`` must be an upload of this process; tokens become real paths.

        Component messages are refused outright: Gradio builds the named component from the
        client's ``constructor_args`` (``Chatbot._preprocess_content``), and a component's
        own file arguments (``icon``, ``avatar_images``, a ``value`` that is a bare path...)
        are copied into the upload folder from anywhere Gradio's output rule allows (the
        system's temp folder), unchecked and past the quota. The UI's histories are text and
        uploaded files only, so a chat message may be nothing else; the key is checked
        wherever it appears (pydantic takes a dict without ``"type"`` as a component message
        too).
        """
        if isinstance(value, list):
            return [self._map_files(item) for item in value]
        if not isinstance(value, dict):
            return value
        if "constructor_args" in value or value.get("type") == "component":
            raise RefusedRequest(400, "Chat messages may hold only text and uploaded files.",
                                 "component_not_allowed")
        mapped = {key: self._map_files(item) for key, item in value.items()}
        if "path" in mapped and mapped["path"] is not None:
            resolved = self.uploads.resolve(mapped["path"])
            if resolved is None:
                raise RefusedRequest(400, "Files can only be given by uploading them first "
                                     "(POST /ui/gradio_api/upload).", "file_not_allowed")
            mapped["path"] = str(resolved)
            mapped.pop("url", None)  # Gradio rebuilds it; a client's URL is never fetched
        return mapped

    # ---------------------------------------------------------------- files
    async def _file(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        resolved = self.uploads.resolve(path[len(f"{API}/file="):])
        if resolved is None:
            raise RefusedRequest(404, "Not found.", "not_found")
        prefix = scope["path"][: len(scope["path"]) - len(path)]
        target = f"{prefix}{API}/file={resolved}"
        keep = {b"host", b"range", b"if-range", b"if-none-match", b"if-modified-since",
                b"accept", b"accept-encoding", b"user-agent"}
        inner = {**scope, "path": target, "raw_path": quote(target).encode(), "query_string": b"",
                 "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() in keep]}

        async def send_filtered(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if k.lower() in FILE_RESPONSE_HEADERS]}
            await send(message)

        await self.app(inner, receive, send_filtered)

    # -------------------------------------------------------------- uploads
    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Over THAI_MAX_REQUEST_BYTES it never gets here: BodyLimitMiddleware (outside the
        # mount) answers 413 from the Content-Length before anything reads the body.
        declared = request_header(scope, b"content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        if length is None or length < 0:
            raise RefusedRequest(411, "Uploads need a Content-Length header.", "length_required")
        client = client_identity(scope)
        full = self.uploads.room_for(client, length)
        if full == "client":
            retry = self.uploads.client_retry_after(client)
            raise RefusedRequest(
                429, f"Your uploads fill your share of the server's storage "
                f"({self.uploads.client_quota_bytes:,} bytes at once); retry in {retry}s, "
                "when your oldest file expires.", "client_upload_quota_exceeded",
                {"Retry-After": str(retry)})
        if full is not None:
            raise RefusedRequest(507, "The server's upload storage is full; try again later.",
                                 "upload_quota_exceeded", {"Retry-After": "60"})
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        with self.uploads.reserve(client, length):  # until its files are recorded below
            await self.app(scope, receive, capture)
            if start is None:
                raise RefusedRequest(500, "The upload failed.", "upload_failed")
            body = b"".join(chunks)
            paths = None
            if start["status"] == 200:
                try:
                    paths = [str(p) for p in json.loads(body)]
                except (ValueError, TypeError):
                    paths = None
                for path in paths or ():
                    self.uploads.record(client, path)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        if start["status"] == 200:
            try:
                if paths is None:
                    raise ValueError("not a list of paths")
                body = json.dumps([self.uploads.token_for(p) for p in paths]).encode()
            except (ValueError, TypeError):
                log.warning("unexpected upload response from Gradio; not forwarded")
                raise RefusedRequest(500, "The upload failed.", "upload_failed") from None
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ helpers
async def _read_body(receive: Receive) -> bytes:
    """The whole body (its size is already bounded by the app's body limit)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RefusedRequest(400, "Client disconnected.", "client_disconnected")
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel: disconnects reach Gradio's streams

    return replay


def _with_body_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", [])
               if k.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def _check_depth(value: Any) -> None:
    """Refuse payloads nested deeper than any event needs, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RefusedRequest(400, f"The request body is nested deeper than {MAX_JSON_DEPTH} "
                                 "levels.", "invalid_request")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
