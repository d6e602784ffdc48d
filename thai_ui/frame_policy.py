"""Who may show the UI in an iframe: ``Content-Security-Policy: frame-ancestors``.

The UI is embeddable by the app's own origin (``'self'``) and by the parent
origins listed in ``THAI_FRAME_ANCESTORS``; browsers refuse to render it inside
any other site. ``X-Frame-Options`` cannot express a list of origins and a
browser that sees both headers may apply the stricter one, so any
``X-Frame-Options`` on a UI response is removed: the CSP is the one policy.
Only responses under the UI's path are touched; the API keeps whatever
headers the rest of the app gives it.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def frame_ancestors_value(origins: Iterable[str]) -> str:
    sources = ["'self'", *(o.strip().rstrip("/") for o in origins if o.strip() and o.strip() != "'self'")]
    return "frame-ancestors " + " ".join(dict.fromkeys(sources))


def merge_csp(existing: str | None, directive: str) -> str:
    """Put ``directive`` into an existing policy, replacing its frame-ancestors if any."""
    kept = [part.strip() for part in (existing or "").split(";")
            if part.strip() and not part.strip().lower().startswith("frame-ancestors")]
    return "; ".join([*kept, directive])


class FramePolicyMiddleware:
    """Pure ASGI (keeps streaming responses streaming) frame policy for one path prefix."""

    def __init__(self, app: ASGIApp, *, prefix: str, origins: Iterable[str]):
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.directive = frame_ancestors_value(origins)

    def _applies(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._applies(scope):
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                del headers["x-frame-options"]
                headers["content-security-policy"] = merge_csp(
                    headers.get("content-security-policy"), self.directive)
            await send(message)

        await self.app(scope, receive, send_with_policy)
