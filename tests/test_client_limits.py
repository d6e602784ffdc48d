"""Anonymous never-ending streams against a small server: the UI's Gradio heartbeat never
ends, and uvicorn's ``limit_concurrency`` counts it. With 20 slots, 20 anonymous sockets
once made ``/health`` and keyed ``/v1/models`` answer 503. Attacked over raw sockets from
one loopback address, the keyed user and the probe coming from another (127.0.0.2).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.support import ServerProcess, start_server

KEY = "client-limits-key-0123456789"
MAX_CONNECTIONS = 20
PER_CLIENT = 16
RESERVED = 4
STREAM_MAX_S = 20.0
HEARTBEAT = "/ui/gradio_api/heartbeat/attacker{}"


@pytest.fixture(scope="module")
def small_server(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
           "THAI_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
           "THAI_RESERVED_CONNECTIONS": str(RESERVED),
           "THAI_ANONYMOUS_STREAM_MAX_S": str(STREAM_MAX_S), "THAI_HEADER_TIMEOUT_S": "30",
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "0", "THAI_RATE_LIMIT_PER_MINUTE": "0",
           "OMP_NUM_THREADS": "1"}
    server = start_server(env, tmp_path_factory.mktemp("client-limits"))
    yield server
    server.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    rest: bytes  # what came after the head


def open_socket(server: ServerProcess, source: str) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return sock


def read_head(sock: socket.socket, timeout: float = 20) -> Answer:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise EOFError(f"closed before a response: {data[:200]!r}")
        data += piece
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Answer(int(status_line.split()[1]), headers, rest)


def heartbeat(server: ServerProcess, source: str, n: int) -> tuple[socket.socket, Answer]:
    sock = open_socket(server, source)
    sock.sendall(f"GET {HEARTBEAT.format(n)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock, read_head(sock)


def body_json(sock: socket.socket, answer: Answer) -> dict:
    size = int(answer.headers["content-length"])
    data = answer.rest
    while len(data) < size:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return json.loads(data[:size])


def still_streaming(sock: socket.socket) -> bool:
    """True while the server has neither ended the chunked stream nor closed the socket."""
    sock.settimeout(0.05)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return True
    return bool(data) and b"\r\n0\r\n\r\n" not in data


def test_heartbeat_flood_from_one_address_leaves_health_and_keyed_api_answered(small_server):
    held: list[socket.socket] = []
    try:
        statuses, codes = [], []
        for n in range(MAX_CONNECTIONS + 4):  # more sockets than the server has slots
            sock, answer = heartbeat(small_server, "127.0.0.1", n)
            statuses.append(answer.status)
            if answer.status == 200:
                assert answer.headers["content-type"].startswith("text/event-stream")
                held.append(sock)
            else:
                codes.append(body_json(sock, answer)["error"]["code"])
                sock.close()
        # The first PER_CLIENT sockets stream; the 17th and every later one is refused.
        assert statuses[:PER_CLIENT] == [200] * PER_CLIENT
        assert statuses[PER_CLIENT:] == [429] * (len(statuses) - PER_CLIENT)
        assert set(codes) == {"too_many_connections"}

        probe = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
        with probe:
            assert probe.get(small_server.url + "/health").status_code == 200
            models = probe.get(small_server.url + "/v1/models",
                               headers={"Authorization": f"Bearer {KEY}"})
            assert models.status_code == 200 and models.json()["data"]
            # Another anonymous address finds the anonymous share (20 - 4 reserved) full...
            sock, answer = heartbeat(small_server, "127.0.0.3", 999)
            assert answer.status == 503 and answer.headers.get("connection") == "close"
            assert body_json(sock, answer)["error"]["code"] == "public_capacity_exhausted"
            sock.close()
            # ...and the reserve still answers the keyed user and the probe.
            assert probe.get(small_server.url + "/health").status_code == 200
            assert probe.get(small_server.url + "/v1/models",
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert all(still_streaming(sock) for sock in held), "streams ended before the checks"
    finally:
        for sock in held:
            sock.close()
    # Closed sockets give their slots back: the address may connect again.
    deadline = time.monotonic() + 60
    while True:
        sock, answer = heartbeat(small_server, "127.0.0.1", 1000)
        sock.close()
        if answer.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer.status == 200


def test_old_anonymous_streams_end_cleanly_when_their_share_is_busy(small_server):
    """With three quarters of the anonymous share (12 of 16) in use, streams older than the
    lifetime are ended, oldest first, until it is not: the first one opened ends, with a
    proper last chunk (httpx raises on a cut stream)."""
    busy = []
    try:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"),
                          timeout=STREAM_MAX_S + 60) as client:
            started = time.monotonic()
            with client.stream("GET", small_server.url + HEARTBEAT.format("life")) as response:
                assert response.status_code == 200
                for n in range(12):  # younger streams: the share is busy
                    sock, answer = heartbeat(small_server, "127.0.0.5", 2000 + n)
                    assert answer.status == 200
                    busy.append(sock)
                body = b"".join(response.iter_bytes())
    finally:
        for sock in busy:
            sock.close()
    assert body.startswith(b"data: ALIVE")
    assert time.monotonic() - started >= STREAM_MAX_S - 1  # not refused, not cut early
    assert "heartbeat/attackerlife: anonymous stream ended: older than" in small_server.log()


# --- in-process: behind the trusted proxy every connection comes from it ------------------------


def _scope(path: str, forwarded_for: str | None, peer: str = "127.0.0.1") -> dict:
    headers = [(b"host", b"thai.example")]
    if forwarded_for:
        headers.append((b"x-forwarded-for", forwarded_for.encode()))
    return {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "headers": headers, "client": (peer, 40000),
            "server": ("127.0.0.1", 8001), "scheme": "http", "http_version": "1.1",
            "asgi": {"version": "3.0"}}


def test_behind_the_proxy_each_forwarded_client_has_its_own_bound():
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from api.client_limits import ClientShareMiddleware
    from api.middleware import TrustedProxyMiddleware

    async def forever(request):
        async def beats():
            while True:
                yield "data: ALIVE\n\n"
                await asyncio.sleep(0.05)
        return StreamingResponse(beats(), media_type="text/event-stream")

    async def health(request):
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/ui/gradio_api/heartbeat", forever), Route("/health", health)])
    shares = ClientShareMiddleware(inner, public_slots=5, per_client=2, stream_max_s=3600)
    app = TrustedProxyMiddleware(shares, trusted=["127.0.0.1"])

    async def request(path: str, forwarded_for: str | None):
        status = asyncio.get_running_loop().create_future()

        async def receive():
            await asyncio.Event().wait()  # never disconnects by itself

        async def send(message):
            if message["type"] == "http.response.start" and not status.done():
                status.set_result(message["status"])

        task = asyncio.ensure_future(app(_scope(path, forwarded_for), receive, send))
        return await asyncio.wait_for(status, 10), task

    async def attack() -> list[int]:
        tasks, statuses = [], []
        for forwarded in ("203.0.113.5", "203.0.113.5", "203.0.113.5",  # third: over 2
                          "203.0.113.6", "203.0.113.7", "203.0.113.8",  # 5 slots in all
                          "203.0.113.9"):                                # share full
            status, task = await request("/ui/gradio_api/heartbeat", forwarded)
            statuses.append(status)
            tasks.append(task)
        statuses.append((await request("/health", "203.0.113.9"))[0])  # the reserve's
        statuses.append((await request("/ui/assets/index.js", "203.0.113.9"))[0])  # uncounted
        assert shares.in_flight == 5
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert shares.in_flight == 0 and not shares.per_client_in_flight
        return statuses

    assert asyncio.run(attack()) == [200, 200, 429, 200, 200, 200, 503, 200, 404]


def test_old_streams_are_left_alone_while_the_share_is_quiet():
    import asyncio

    from starlette.responses import StreamingResponse

    from api.client_limits import ClientShareMiddleware

    async def forever(scope, receive, send):
        async def beats():
            while True:
                yield "data: ALIVE\n\n"
                await asyncio.sleep(0.02)
        await StreamingResponse(beats(), media_type="text/event-stream")(scope, receive, send)

    async def run(public_slots: int) -> list[dict]:
        shares = ClientShareMiddleware(forever, public_slots=public_slots, per_client=8,
                                       stream_max_s=0.1)
        sent: list[dict] = []

        async def receive():
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        task = asyncio.ensure_future(shares(_scope("/ui/gradio_api/heartbeat", None), receive, send))
        while not any(m.get("more_body") is False for m in sent) and len(sent) < 200:
            await asyncio.sleep(0.01)  # bounded: 200 pieces of 20 ms
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return sent

    quiet = asyncio.run(run(public_slots=8))  # 1 of 8 in flight: no pressure
    assert not any(m.get("more_body") is False for m in quiet) and len(quiet) >= 200
    busy = asyncio.run(run(public_slots=1))  # 1 of 1: over age, ended with a last chunk
    assert busy[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_trusted_proxies_are_exempt_from_the_connection_count():
    from api.http_protocol import guarded_protocol
    from api.settings import ServerSettings

    bound = guarded_protocol(ServerSettings(forwarded_allow_ips=["127.0.0.1"], max_connections=100,
                                            max_connections_per_client=10))
    assert bound.max_connections_per_client == 10
    assert "127.0.0.1" in bound.exempt_addresses and "203.0.113.5" not in bound.exempt_addresses
    other = guarded_protocol(ServerSettings())
    assert other.connections_per_address is not bound.connections_per_address  # one per server


def test_connection_shares_fit_below_the_connection_limit():
    from api.settings import ServerSettings, SettingsError, Settings

    small = ServerSettings(max_connections=20)
    assert small.reserved_connections == 8 and small.max_connections_per_client == 12
    tiny = ServerSettings(max_connections=4)
    assert tiny.reserved_connections == 1 and tiny.max_connections_per_client == 3
    for bad in ({"max_connections": 20, "max_connections_per_client": 18},
                {"max_connections": 20, "reserved_connections": 20}):
        with pytest.raises(SettingsError, match="THAI_"):
            Settings.from_overrides(bad)
