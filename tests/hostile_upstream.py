"""A hostile OpenAI-compatible upstream for THAI_ENGINE=openai tests: a raw asyncio HTTP/1.1
server on 127.0.0.1 in a thread of the test process (the front under test is another
process, so its memory is measured apart from this one's).

What a chat request gets is chosen by its last message's text (``behaviour``); the health
path answers as ``health`` says. Huge bodies are written in 64 KiB pieces as the reader
takes them, so this server holds none of them; ``sent`` counts what it managed to write,
``received`` keeps every request body it was sent.
"""

from __future__ import annotations

import asyncio
import json
import threading

from tests.support import free_port

PIECE = 64 * 1024
HUGE = 128 * 1024 * 1024  # a huge body: 128 MiB
DIRTY = ("bad\n\x1b[31mCRITICAL forged log line\x1b[0m\r\n\x07\u202e" + "ข้อผิดพลาด " * 600)


def sse(event: object) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def text_event(text: str) -> bytes:
    return sse({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


class HostileUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = "ok"
        self.health_probes = 0
        self.received: list[tuple[str, dict]] = []
        self.sent: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-upstream", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "HostileUpstream":
        self._thread.start()
        assert self._ready.wait(10), "the hostile upstream did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    # ------------------------------------------------------------- requests
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            _, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(":", 1) for line in lines if ":" in line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            body = json.loads(raw) if raw else {}
            if path == "/health":
                self.health_probes += 1
                await self._health(writer)
            elif path == "/v1/models":
                await self._answer(writer, 200, json.dumps({"object": "list", "data": [
                    {"id": "thai-qwen-lora", "object": "model", "max_model_len": 4096}]}).encode())
            else:
                self.received.append((path, body))
                await self._generation(writer, body)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _health(self, writer) -> None:
        if self.health == "huge":
            await self._head(writer, 200, "application/json", length=HUGE)
            await self._flood(writer, "health", b"", HUGE)
        else:
            await self._answer(writer, 200, b"{}")

    async def _generation(self, writer, body: dict) -> None:
        messages = body.get("messages") or [{"content": "ok"}]
        behaviour = messages[-1].get("content") or "ok"
        if behaviour == "huge-error":
            await self._head(writer, 400, "application/json", length=HUGE)
            await self._flood(writer, behaviour, b'{"error": {"message": "', HUGE)
        elif behaviour == "dirty-error":
            await self._answer(writer, 429, json.dumps({"error": {
                "message": DIRTY, "type": "rate_limit\nCRITICAL", "code": "x\x1b[2J",
                "param": "a" * 5000}}).encode(), retry_after="99999999")
        elif behaviour == "dirty-event":
            await self._head(writer, 200, "text/event-stream")
            writer.write(text_event("ก") + sse({"error": {"message": DIRTY}}))
            await writer.drain()
        elif behaviour == "huge-json":
            await self._head(writer, 200, "application/json", length=HUGE)
            await self._flood(writer, behaviour, b'{"choices": [{"index": 0, "message": {"content": "', HUGE)
        elif behaviour == "huge-line":
            await self._head(writer, 200, "text/event-stream")
            await self._flood(writer, behaviour, b'data: {"choices": [{"index": 0, "delta": {"content": "', HUGE)
        elif behaviour == "endless":
            await self._head(writer, 200, "text/event-stream")
            await self._forever(writer, behaviour, text_event("ข่าว"), pause=0)
        elif behaviour == "comments":
            await self._head(writer, 200, "text/event-stream")
            await self._forever(writer, behaviour, b": keep-alive\n\n" + sse({"choices": []}),
                                pause=0.05)
        else:
            await self._head(writer, 200, "text/event-stream")
            writer.write(text_event("สวัสดี") + text_event("ครับ") + sse(
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
                + b"data: [DONE]\n\n")
            await writer.drain()

    # -------------------------------------------------------------- writing
    @staticmethod
    async def _head(writer, status: int, kind: str, length: int | None = None,
                    retry_after: str | None = None) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {kind}", "Connection: close"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()

    async def _answer(self, writer, status: int, body: bytes, retry_after: str | None = None) -> None:
        await self._head(writer, status, "application/json", len(body), retry_after)
        writer.write(body)
        await writer.drain()

    async def _flood(self, writer, name: str, prefix: bytes, total: int) -> None:
        """``prefix`` then ``x`` up to ``total`` bytes, as fast as the reader takes them."""
        filler = b"x" * PIECE
        writer.write(prefix)
        sent = len(prefix)
        try:
            while sent < total:
                piece = filler[: total - sent]
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
                await asyncio.sleep(0)  # the kernel took it all: let other connections run
        finally:
            self.sent[name] = self.sent.get(name, 0) + sent

    async def _forever(self, writer, name: str, piece: bytes, pause: float) -> None:
        sent = 0
        try:
            while True:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
                await asyncio.sleep(pause)
        finally:
            self.sent[name] = self.sent.get(name, 0) + sent
