"""Reading what an upstream server sends, within bounds.

An upstream is trusted to generate, not to behave: a broken or hostile one (a proxy in a
bad state, a compromised replica, a misconfigured URL) can answer a 1 GB error page, an
event stream that never ends, or an error text with newlines and terminal escapes. So:

- every body is read through :func:`read_capped` or :func:`events`, which stop at a byte
  bound (``THAI_UPSTREAM_MAX_ERROR_BYTES`` for errors and probes, ``..._MAX_RESPONSE_BYTES``
  for a generation) and never hold more than that in memory;
- bodies are read raw: we ask for ``Accept-Encoding: identity`` and a body compressed
  anyway is refused, since a decompressor's output is not bounded by what was read;
- what the upstream says about its error (message, type, code, param, Retry-After) is
  cleaned and length-capped before a client sees it: never its raw text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from api.engine.errors import UpstreamError, UpstreamStatusError

MAX_UPSTREAM_MESSAGE_CHARS = 500  # the most of an upstream's error text a client is shown
MAX_RETRY_AFTER_S = 3600          # an upstream's Retry-After is relayed up to this
PASSED_STATUSES = frozenset({400, 408, 409, 413, 429, 503})  # others < 500: 400

# Terminal escape sequences: CSI (``ESC [ ... m``), OSC (``ESC ] ... BEL``) and the
# two-character ones. What is left of them after this is removed as non-printable.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?")
_NAME = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,64}")


class UpstreamTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, with one race below it read as what it is. When an upstream dies
    while a connection to it is being opened, anyio's socket stream can find its socket
    already gone, and httpcore's connect raises ``AttributeError: 'NoneType' object has no
    attribute 'getpeername'`` (seen with a replica killed mid-load) instead of a connection
    error: a 500 where the request should have gone to another replica."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except AttributeError as exc:
            if "'NoneType' object has no attribute" not in str(exc):
                raise
            raise httpx.ConnectError(f"the connection closed while it was opened ({exc})",
                                     request=request) from exc


class UpstreamTooLargeError(UpstreamStatusError):
    """The upstream sent more than this server reads (bytes, or text for the tokens asked)."""

    def __init__(self, message: str):
        super().__init__(502, message, "upstream_error", "upstream_response_too_large")


def clean_message(text: str, limit: int = MAX_UPSTREAM_MESSAGE_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters: escape sequences and
    control characters (newlines, carriage returns, bidi overrides...) become spaces, runs of
    spaces one, and a longer text is cut with an ellipsis."""
    text = _ESCAPES.sub(" ", text[: limit * 4])
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_name(value: object) -> str | None:
    """An upstream's error ``type``/``code``/``param`` when it looks like an identifier."""
    return value if isinstance(value, str) and _NAME.fullmatch(value) else None


def identity_encoded(response: httpx.Response) -> bool:
    return response.headers.get("content-encoding", "identity").strip().lower() in ("", "identity")


async def read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """``response``'s body when it has at most ``limit`` bytes, else (b"", True): the rest
    is left unread (closing the response then drops the connection), and what was read is
    dropped, as no caller uses part of a body."""
    try:
        content = response.content  # a response that was read already (tests build these)
    except httpx.ResponseNotRead:
        pass
    else:
        return (content, False) if len(content) <= limit else (b"", True)
    pieces: list[bytes] = []  # joined once at the end: no buffer regrown piece by piece
    size = 0
    async for chunk in response.aiter_raw():
        if size + len(chunk) > limit:
            return b"", True
        pieces.append(chunk)
        size += len(chunk)
    return b"".join(pieces), False


# ------------------------------------------------------------------- generations
DONE = None  # what :func:`events` yields for ``data: [DONE]``


def events(response: httpx.Response, limit: int, plain: bool) -> AsyncIterator[dict[str, Any] | None]:
    """The events of a 200 answer to a generation: each ``data:`` JSON object of an event
    stream, or one event made from a non-streamed JSON answer (servers that ignore
    ``stream: true``), then :data:`DONE` where the upstream said so. At most ``limit`` bytes
    are read in all (:class:`UpstreamTooLargeError` past them)."""
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _json_events(response, limit, plain)
    return _sse_events(response, limit)


def _too_large(limit: int) -> UpstreamTooLargeError:
    return UpstreamTooLargeError(f"The model server's answer is larger than this server reads "
                                 f"({limit} bytes, THAI_UPSTREAM_MAX_RESPONSE_BYTES).")


def _check_encoding(response: httpx.Response) -> None:
    if not identity_encoded(response):
        raise UpstreamError("The model server sent a compressed answer, which this server does "
                            "not read (it asks for Accept-Encoding: identity).")


async def _sse_events(response: httpx.Response, limit: int) -> AsyncIterator[dict[str, Any] | None]:
    """Lines are split on ``\\n`` (a ``\\r`` before it dropped); comments (``: keep-alive``),
    event names and blank lines are skipped, but their bytes count towards ``limit``."""
    _check_encoding(response)
    pending: list[bytes] = []  # the pieces of a line not ended yet
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        begin = 0
        while (end := chunk.find(b"\n", begin)) >= 0:
            line = chunk[begin:end]
            if pending:
                line, pending = b"".join(pending) + line, []
            begin = end + 1
            event = _parse_line(line)
            if event is not _SKIP:
                yield event
        if begin < len(chunk):
            pending.append(chunk[begin:])
    if pending:
        event = _parse_line(b"".join(pending))
        if event is not _SKIP:
            yield event


_SKIP = object()


def _parse_line(line: bytes) -> object:
    line = line.rstrip(b"\r")
    if not line.startswith(b"data:"):
        return _SKIP  # blank separators, comments (keep-alives), event names
    data = line[5:].strip()
    if data == b"[DONE]":
        return DONE
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamError("The model server sent a malformed event.") from None
    return event if isinstance(event, dict) else _SKIP


async def _json_events(response: httpx.Response, limit: int,
                       plain: bool) -> AsyncIterator[dict[str, Any] | None]:
    _check_encoding(response)
    raw, more = await read_capped(response, limit)
    if more:
        raise _too_large(limit)
    try:
        payload = json.loads(raw)
    except ValueError:
        raise UpstreamError("The model server sent a malformed answer.") from None
    if not isinstance(payload, dict):
        raise UpstreamError("The model server sent a malformed answer.")
    choices = []
    for choice in payload.get("choices") or []:
        if isinstance(choice, dict) and not plain:  # a chat completion's message as a delta
            message = choice.get("message")
            choice = {"index": choice.get("index", 0), "finish_reason": choice.get("finish_reason"),
                      "delta": message if isinstance(message, dict) else {}}
        choices.append(choice)
    yield {**{key: payload[key] for key in ("usage", "error") if key in payload}, "choices": choices}
    yield DONE


# ------------------------------------------------------------------------ errors
def describe(exc: BaseException) -> str:
    """A short, URL-free description of a transport failure (shown to clients and in /health)."""
    names = {httpx.ConnectError: "connection refused or unreachable",
             httpx.ConnectTimeout: "connection timed out", httpx.ReadTimeout: "read timed out",
             httpx.RemoteProtocolError: "connection closed", httpx.ReadError: "connection lost",
             httpx.PoolTimeout: "no free connection", TimeoutError: "timed out"}
    for cls, text in names.items():
        if isinstance(exc, cls):
            return text
    return type(exc).__name__


def _field(mapping: object, key: str, kinds: type | tuple[type, ...] = str):
    """``mapping[key]`` when ``mapping`` is a dict and the value has one of ``kinds``, else
    None: upstream error bodies come in several shapes, and none is trusted."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, kinds) and not isinstance(value, bool) else None


def _retry_after(value: str | None) -> str | None:
    if value is None or not re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return None  # an HTTP date, or junk: the client's own backoff applies
    return str(min(int(value), MAX_RETRY_AFTER_S))


async def status_error(response: httpx.Response, limit: int = 64 * 1024) -> UpstreamStatusError:
    """The upstream's non-200 answer as an error with the status the client should get: at
    most ``limit`` bytes of its body are read, and only cleaned fields of it are kept."""
    payload: object = {}
    try:
        raw, more = await read_capped(response, limit) if identity_encoded(response) else (b"", True)
        if raw and not more:
            payload = json.loads(raw)
    except (httpx.HTTPError, ValueError):
        payload = {}
    detail = _field(payload, "error", dict)
    if detail is None:  # vLLM 0.x errors: {"message": ..., "type": ..., "code": ...}
        detail = payload if _field(payload, "message") is not None else {}
    status = response.status_code
    if status in (401, 403):  # our key, not the client's: a gateway problem
        return UpstreamStatusError(502, "The model server refused this gateway's credentials "
                                   "(THAI_UPSTREAM_API_KEY).", "upstream_error", "upstream_auth_failed")
    if status == 404:  # the client's model name was checked here: ours is misconfigured
        said = clean_message(_field(detail, "message") or "")
        return UpstreamStatusError(502, "The model server does not serve the configured model "
                                   f"(THAI_UPSTREAM_MODEL): {said}".rstrip(": "),
                                   "upstream_error", "upstream_model_not_found")
    if status not in PASSED_STATUSES and status < 500:
        status = 400
    if status >= 500 and status != 503:
        status = 502
    # FastAPI's HTTPException body (transformers serve) is {"detail": "..."}
    message = clean_message(_field(detail, "message") or _field(payload, "detail") or "")
    code = _field(detail, "code", (str, int))
    code = code if isinstance(code, int) and abs(code) < 10**6 else clean_name(code)
    return UpstreamStatusError(
        status, message or f"The model server answered HTTP {response.status_code}.",
        clean_name(_field(detail, "type")), code,
        param=clean_name(_field(detail, "param")),
        retry_after=_retry_after(response.headers.get("retry-after")))


def event_error(detail: dict) -> UpstreamError:
    """An error event in the middle of an upstream's stream, its message cleaned."""
    message = clean_message(_field(detail, "message") or "")
    return UpstreamError(message or "The model server reported an error mid-stream.")
