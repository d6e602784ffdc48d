"""Limits on how much, and how slowly, a client may send: for a server facing the internet.

Without nginx in front, uvicorn's own protocol is what an attacker talks to, and
with httptools it has no limit on a request's headers and no deadline for them:

- **Header size and count.** httptools accepts a request line and headers of any
  size and any number of header fields; while a header value is incomplete it
  keeps appending the received bytes to one buffer, so a never-finished 25 MB
  header costs the server 25 MB (twenty of them half a gigabyte).
- **Slow headers (slowloris).** uvicorn's only timer is the keep-alive timeout,
  armed *between* requests and cancelled by the first byte of the next one; a
  client that sends a header a byte at a time, or connects and sends nothing,
  holds a connection (and a slot of ``limit_concurrency``) for ever.
- **Slow bodies.** Nothing bounds the time a request body takes either.

:class:`GuardedHttpToolsProtocol` (bound to the settings by
:func:`guarded_protocol`, passed to ``uvicorn.Config(http=...)``) counts the raw
bytes and the header fields of each request head and answers ``431`` past
``THAI_MAX_HEADER_BYTES`` / ``THAI_MAX_HEADERS``, and ``408`` when a head is not
complete within ``THAI_HEADER_TIMEOUT_S``; neither starts the ASGI app. The rest
of a body the app answered without reading must come within
``THAI_BODY_TIMEOUT_S`` too, or the connection is closed. One client address may
hold at most ``THAI_MAX_CONNECTIONS_PER_CLIENT`` connections (the trusted proxies
of ``THAI_FORWARDED_ALLOW_IPS`` excepted: behind them the request-level bound of
:mod:`api.client_limits` counts the forwarded client); the next one is answered
``429`` and closed, so no single address can take every slot of
``THAI_MAX_CONNECTIONS``.
:class:`BodyTimeoutMiddleware` (:func:`install_body_timeout`) answers ``408``
when a body takes longer than ``THAI_BODY_TIMEOUT_S`` in all, or a third of it
between two pieces.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httptools
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.errors import APIError, error_body
from api.middleware import run_with_guarded_receive

log = logging.getLogger("thai.http")


class _Refused(Exception):
    """Raised from a parser callback to stop httptools at once (it surfaces from
    ``feed_data`` as ``HttpParserCallbackError``, which :meth:`data_received` turns
    into our answer instead of uvicorn's 400)."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a deadline for request heads.

    *Size.* Counting in ``on_header`` alone is not enough: httptools calls it only once
    a field is complete and buffers a partial value itself. So :meth:`data_received`
    counts the raw bytes received while a head is incomplete and feeds the parser at
    most ``max_header_bytes`` of them: a head that is not complete by then is answered
    ``431`` without the parser (or anything else) ever holding more than the limit.
    The number of fields is counted in :meth:`on_header`.

    *Time.* A timer armed when the connection is made and when the first byte of a
    request arrives (or ``on_message_begin``), cancelled when the head is complete,
    answers ``408``. A connection that sent nothing at all is closed silently, as
    nginx and uvicorn's own keep-alive timeout do. Idle time between requests stays
    governed by uvicorn's ``timeout_keep_alive``.

    A refusal written while an earlier (pipelined) request's response is still going
    out waits for it to finish. After a refusal the parser is fed nothing more, so
    its later callbacks cannot run or start the app; the connection's write side is
    shut, and what the client still sends is read and dropped for ``linger_s`` (so
    that the kernel does not answer unread bytes with a reset that would destroy
    the answer before the client reads it), then the connection is closed.

    The limits are class attributes; :func:`guarded_protocol` binds them to settings.
    """

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    # Once the response is complete, the rest of a body the app did not read must
    # arrive within this time (uvicorn would otherwise read and drop it for ever).
    unread_body_timeout_s: float = 60.0
    linger_s: float = 2.0
    # Open connections per client address, shared by every connection of one server
    # (guarded_protocol binds a fresh dict); None: no per-address bound. Addresses that
    # are ``in exempt_addresses`` (the trusted proxies) are not counted.
    max_connections_per_client: int | None = None
    connections_per_address: dict[str, int] | None = None
    addresses_at_limit: set[str] = set()  # replaced per server by guarded_protocol
    exempt_addresses: object = frozenset()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # between two requests, or inside a request's head
        self._head_bytes = 0  # raw bytes of the current head seen so far
        self._header_count = 0
        self._field_bytes = 0  # bytes of the current head's complete header fields
        self._head_timer: asyncio.TimerHandle | None = None
        self._unread_body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None  # (status, message, code), once decided
        self._refusal_sent = False
        self._counted_address: str | None = None  # counted in connections_per_address

    # --- connection ---------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._count_connection():
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._counted_address is not None:
            counts = self.connections_per_address
            left = counts.get(self._counted_address, 1) - 1
            if left > 0:
                counts[self._counted_address] = left
            else:
                counts.pop(self._counted_address, None)
            self.addresses_at_limit.discard(self._counted_address)
            self._counted_address = None
        super().connection_lost(exc)

    def _count_connection(self) -> bool:
        """Count this connection for its address; False when the address already holds
        ``max_connections_per_client`` (then it is answered 429 and closed)."""
        limit, counts = self.max_connections_per_client, self.connections_per_address
        address = self.client[0] if self.client else None
        if limit is None or counts is None or not address or address in self.exempt_addresses:
            return True
        held = counts.get(address, 0)
        if held >= limit:
            # Out of uvicorn's count at once: a refused connection lingers a moment (so the
            # client reads its answer) but must not take a slot of THAI_MAX_CONNECTIONS.
            self.connections.discard(self)
            # One warning per address each time it reaches the limit, not one per refusal.
            first = address not in self.addresses_at_limit
            self.addresses_at_limit.add(address)
            self._refuse(429, f"This address already holds {limit} connections, this server's "
                              "limit per client (THAI_MAX_CONNECTIONS_PER_CLIENT).",
                         "too_many_connections", log_level=None if first else logging.DEBUG)
            return False
        counts[address] = held + 1
        self._counted_address = address
        return True

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: drop whatever still comes, never feed the parser again
        self._unset_keepalive_if_required()
        while data:
            if not self._reading_head:
                self._feed(data)  # a body: BodyTimeoutMiddleware and flow control govern it
                return
            if self.cycle is None or self.cycle.response_complete:
                # A byte of a head while nothing is being answered: the client's clock
                # runs (even before on_message_begin: llhttp skips stray CRLFs silently,
                # and uvicorn's keep-alive timer is cancelled by any byte).
                self._arm_head_timer()
            room = self.max_header_bytes - self._head_bytes
            if room <= 0:
                self._refuse_too_large()
                return
            # Feed no more than the limit allows: if the head is complete within it the
            # callbacks switch to the body (or the next request) and the loop goes on.
            # (Where one read holds the end of a request and the start of the next, that
            # start is not counted here, so the parser may hold up to one read, 256 KiB,
            # more; on_headers_complete still holds such a head to the limit.)
            chunk, data = data[:room], data[room:]
            self._head_bytes += len(chunk)
            if not self._feed(chunk):
                return

    def _feed(self, data: bytes) -> bool:
        """Feed the parser as uvicorn does; False when the connection is done with."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            if self._refusal is not None:  # raised by our own callback: our answer wins
                return False
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self._cancel_timers()
            self.send_400_response(msg)
            return False
        return self._refusal is None and not self.transport.is_closing()

    # --- parser callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_count = self._field_bytes = 0
        self._arm_head_timer()
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self._refuse(431, f"Request has more than this server's limit of {self.max_headers} "
                              "header fields (THAI_MAX_HEADERS).", "too_many_headers")
            raise _Refused
        self._field_bytes += len(name) + len(value) + 3  # at least "name:value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        # The raw count misses the start of a head that shares a read with the end of
        # the request before it (pipelining); measured from its parts (a lower bound:
        # single spaces), such a head is held to the limit too.
        size = len(self.parser.get_method()) + len(self.url) + 12 + self._field_bytes + 2
        if size > self.max_header_bytes:
            self._refuse_too_large()
            raise _Refused
        self._cancel(self._head_timer)
        self._head_timer = None
        self._reading_head = False
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is not None:
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._reading_head, self._head_bytes, self._header_count = True, 0, 0
        self._cancel(self._unread_body_timer)
        self._unread_body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._refusal is not None and not self.pipeline:
            # A refusal decided while this response was going out: its turn now.
            self.server_state.total_requests += 1
            if not self.transport.is_closing():
                self._send_refusal()
            return
        super().on_response_complete()
        if (not self._reading_head and self._refusal is None and not self.transport.is_closing()
                and self._unread_body_timer is None):
            # Answered before the body was read (401, 404, ...): uvicorn keeps reading and
            # dropping it; a client trickling it must not hold the connection for ever.
            self._unread_body_timer = self.loop.call_later(self.unread_body_timeout_s,
                                                           self._close_quietly)

    def shutdown(self) -> None:
        if self._refusal is not None:
            self.transport.close()
            return
        super().shutdown()

    # --- refusals -----------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self._refusal is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refusal is not None or self.transport.is_closing() or not self._reading_head:
            return
        if self._head_bytes == 0 and self.cycle is None:
            # Connected and never sent a byte: close without an answer (nothing was asked).
            self.transport.close()
            return
        self._refuse(408, f"Request line and headers were not received within "
                          f"{self.header_timeout_s:g} seconds (THAI_HEADER_TIMEOUT_S).",
                     "header_timeout")

    def _refuse_too_large(self) -> None:
        self._refuse(431, f"Request line and headers are larger than this server's limit of "
                          f"{self.max_header_bytes} bytes (THAI_MAX_HEADER_BYTES).",
                     "request_header_too_large")

    def _refuse(self, status: int, message: str, code: str, log_level: int | None = None) -> None:
        if self._refusal is not None:
            return
        self._refusal = (status, message, code)
        self._cancel(self._head_timer)
        self._head_timer = None
        level = log_level or (logging.INFO if status == 408 else logging.WARNING)
        client = "%s:%d" % self.client if self.client else "client"
        self.logger.log(level, "%s: %d %s", client, status, message)
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and not self.pipeline:
            self._send_refusal()
        # else: on_response_complete sends it once the response in flight is out

    def _send_refusal(self) -> None:
        if self._refusal_sent or self._refusal is None:
            return
        self._refusal_sent = True
        self._cancel_timers()
        status, message, code = self._refusal
        kind = "rate_limit_error" if status == 429 else "invalid_request_error"
        body = json.dumps(error_body(status, message, kind, None, code)).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        if status in (429, 503):
            content.append(b"retry-after: 1\r\n")
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n\r\n", body])
        self.transport.write(b"".join(content))
        try:
            can_half_close = self.transport.can_write_eof()
        except (AttributeError, NotImplementedError, RuntimeError):
            can_half_close = False
        if not can_half_close:
            self.transport.close()
            return
        # Lingering close (as nginx does): the client may still be sending the rest of a
        # huge head; closing now with those bytes unread makes the kernel send a reset
        # that can destroy the answer. Shut our side, drop what comes, close soon.
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(self.linger_s, self._close_quietly)

    def _close_quietly(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._unread_body_timer, self._linger_timer):
            self._cancel(timer)
        self._head_timer = self._unread_body_timer = self._linger_timer = None


def guarded_protocol(server_settings) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass bound to ``server_settings``'s limits,
    for ``uvicorn.Config(http=...)``."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": server_settings.max_header_bytes,
        "max_headers": server_settings.max_headers,
        "header_timeout_s": server_settings.header_timeout_s,
        "unread_body_timeout_s": server_settings.body_timeout_s,
        "max_connections_per_client": server_settings.max_connections_per_client,
        "connections_per_address": {},
        "addresses_at_limit": set(),
        # uvicorn's own parser of "127.0.0.1, 10.0.0.0/8, *", as TrustedProxyMiddleware uses it.
        "exempt_addresses": ProxyHeadersMiddleware(
            None, trusted_hosts=list(server_settings.forwarded_allow_ips)).trusted_hosts,
        "__module__": __name__,
    })


# --- request bodies ---------------------------------------------------------------------


class BodyTimeout(HTTPException, APIError):
    """Raised from ``receive`` when a body is too slow; answered 408 with ``Connection: close``.

    An ``HTTPException`` so that FastAPI's body parsing re-raises it and the app's
    handler answers it in the OpenAI envelope (with its ``code`` and headers), and an
    :class:`~api.errors.APIError` so that any other handler that maps exceptions to
    statuses (``RequestIdMiddleware``'s) says 408 too, never 500.
    """

    status_code = 408
    error_type = "invalid_request_error"
    code = "body_timeout"

    def __init__(self, message: str):
        HTTPException.__init__(self, 408, message, headers={"Connection": "close"})
        self.message, self.param = message, None


class BodyTimeoutMiddleware:
    """Bounds the time a request body takes: ``total_s`` in all, ``gap_s`` between pieces.

    Pure ASGI, so a streamed response still goes out chunk by chunk. Only ``receive``
    is wrapped, and only while the body is incomplete: after its last piece a
    streaming response calls ``receive()`` to wait for the client to disconnect, and
    that wait must never time out. The clock starts at the app's first ``receive()``.
    Like :class:`api.middleware.BodyLimitMiddleware`, it raises from ``receive`` (so
    FastAPI answers) and answers itself what escapes, unless the response started.
    """

    def __init__(self, app: ASGIApp, total_s: float, gap_s: float | None = None):
        self.app, self.total_s = app, total_s
        self.gap_s = gap_s if gap_s is not None else total_s / 3

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_done = False
        deadline: float | None = None

        async def timed_receive() -> Message:
            nonlocal body_done, deadline
            if body_done:
                return await receive()
            now = loop.time()
            if deadline is None:
                deadline = now + self.total_s
            left = deadline - now
            if left <= 0:
                raise BodyTimeout(self._total_message())
            try:
                message = await asyncio.wait_for(receive(), min(self.gap_s, left))
            except asyncio.TimeoutError:
                body_done = True
                raise BodyTimeout(self._total_message() if self.gap_s >= left
                                  else self._gap_message()) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await run_with_guarded_receive(self.app, scope, receive, send, timed_receive, BodyTimeout)

    def _total_message(self) -> str:
        return (f"Request body was not received within {self.total_s:g} seconds "
                "(THAI_BODY_TIMEOUT_S).")

    def _gap_message(self) -> str:
        return (f"Request body stalled: nothing received for {self.gap_s:g} seconds "
                "(a third of THAI_BODY_TIMEOUT_S).")


def install_body_timeout(app, settings) -> None:
    """Add :class:`BodyTimeoutMiddleware` with ``settings.server.body_timeout_s``.

    Best called before ``install_http_guards`` (middlewares added later wrap earlier
    ones), so the request id and security headers are added to its 408 too.
    """
    server = getattr(settings, "server", settings)
    app.add_middleware(BodyTimeoutMiddleware, total_s=server.body_timeout_s)
