"""The UI's root URL never follows a client's Host header.

Gradio (6.31) builds the ``root`` of its page config, and every file URL in it,
from the request: ``Host: evil.example`` made ``/ui/config`` and the page say
``"root": "http://evil.example/ui"``, and the page's script keeps a root whose
host differs from its own location, so a cache in front could hand visitors a
page that talks to another site. :class:`RelativeRootMiddleware` rewrites that
absolute root to its path (``/ui``, or ``/prefix/ui`` under ``THAI_ROOT_PATH``)
in the two answers that carry it, the page and ``/ui/config``; the page's script
resolves a relative root against its own location (Gradio's ``resolve_root``).
``THAI_ALLOWED_HOSTS`` (:class:`api.middleware.AllowedHostsMiddleware`) can in
addition refuse unknown hosts outright.

Only small, whole answers are rewritten (the page and the config, never a
stream); what does not look like them passes untouched.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.security import route_path

MAX_REWRITE_BYTES = 16 * 1024 * 1024  # the page and its config are far smaller
_ROOT = re.compile(rb'"root":\s*"(https?://[^"\\]+)"')


def relative_root(body: bytes) -> bytes:
    """``body`` with its absolute ``"root"`` (and URLs under it) made a path."""
    match = _ROOT.search(body)
    if not match:
        return body
    absolute = match.group(1)
    path = urlsplit(absolute.decode("latin-1")).path.rstrip("/").encode("latin-1")
    return body.replace(b'"' + absolute, b'"' + path)


class RelativeRootMiddleware:
    """Pure ASGI; buffers only a ``GET`` of the UI page or ``/ui/config`` (a ``HEAD`` has no
    body to rewrite)."""

    def __init__(self, app: ASGIApp, *, prefix: str):
        self.app = app
        self.paths = {prefix, prefix + "/", prefix + "/config"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "GET"
                or route_path(scope) not in self.paths):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passing = False  # not rewritable (a stream, too big): pass as it comes

        async def buffering_send(message: Message) -> None:
            nonlocal start, size, passing
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if not kind.startswith((b"text/html", b"application/json")):
                    passing = True
                    await send(message)
                    return
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_REWRITE_BYTES:  # give up rewriting: send what we have, as is
                passing = True
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks),
                            "more_body": message.get("more_body", False)})
                return
            if message.get("more_body", False):
                return
            body = relative_root(b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode("ascii")))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffering_send)
