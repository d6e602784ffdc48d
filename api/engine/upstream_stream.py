"""One generation relayed from an upstream server (``THAI_ENGINE=openai``): the request
sent, the retry before any text, the events read back within bounds (``upstream_http``)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httpx

from api.engine.base import GenerationStream
from api.engine.errors import GenerationTimeoutError, NoHealthyUpstreamError, UpstreamError
from api.engine.types import GenerationChunk, GenerationRequest
from api.engine.upstream_http import DONE, UpstreamTooLargeError, describe, event_error, events, status_error

if TYPE_CHECKING:
    from api.engine.upstream_engine import Upstream, UpstreamEngine

RETRIED_STATUSES = frozenset({500, 502, 503, 504})


class UpstreamStream(GenerationStream):
    """One generation relayed from an upstream's SSE stream, retried once before any text.

    Bounded whatever the upstream does: the whole generation (opening, retry, every read)
    has one deadline, ``THAI_REQUEST_TIMEOUT_S`` from its creation, so keep-alive comments
    or empty events cannot stretch it; at most ``THAI_UPSTREAM_MAX_RESPONSE_BYTES`` of the
    answer are read; and the text may not exceed what ``max_tokens`` tokens can spell."""

    def __init__(self, engine: UpstreamEngine, request: GenerationRequest):
        self.engine, self.request = engine, request
        self.body = engine.body(request)
        self.path = "/v1/completions" if request.plain_prompt else "/v1/chat/completions"
        self.upstream: Upstream | None = None
        self.tried: list[Upstream] = []
        self._response: httpx.Response | None = None
        self._events: Any = None  # upstream_http.events of the response
        self._opened_at = 0.0
        self._arrived = time.monotonic()
        self._deadline = self._arrived + engine.settings.request_timeout_s
        self._max_chars = request.params.max_tokens * engine.token_chars
        self._chars = 0
        self._first_text_at: float | None = None
        self._text: list[str] = []
        self._chunks = 0
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._done = False

    # -------------------------------------------------------------- opening
    async def wait_open(self) -> None:
        if self._response is None and not self._done:
            try:
                async with asyncio.timeout(self._deadline - time.monotonic()):
                    await self._open()
            except TimeoutError:
                raise self._timed_out() from None

    async def _open(self) -> None:
        """Connect to the least busy upstream; on a connection failure or a 5xx, once more to
        another. Other errors pass through with the upstream's status and message."""
        engine, metrics = self.engine, self.engine.upstream_metrics
        last: Exception | None = None
        for attempt in range(2):
            upstream = engine.pool.pick(exclude=self.tried[-1] if self.tried else None)
            if upstream is None:
                break
            self.tried.append(upstream)
            engine.pool.acquire(upstream)
            self.upstream, self._opened_at = upstream, time.monotonic()
            labels = metrics.labels(upstream)
            try:
                assert engine.client is not None
                request = engine.client.build_request(
                    "POST", upstream.url + self.path, json=self.body,
                    headers=engine.headers(self.request.request_id))
                response = await engine.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._release()
                metrics.errors.labels(*labels, "connect").inc()
                metrics.requests.labels(*labels, "retried" if attempt == 0 else "error").inc()
                if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                    engine.pool.mark(upstream, False, describe(exc))
                last = UpstreamError(f"The model server could not be reached ({describe(exc)}).")
                continue
            except BaseException:
                self._release()
                raise
            if response.status_code == 200:
                self._response = response
                self._events = events(response, engine.settings.upstream_max_response_bytes,
                                      self.request.plain_prompt)
                return
            try:
                error = await status_error(response, engine.settings.upstream_max_error_bytes)
            finally:
                await response.aclose()
                self._release()
            metrics.errors.labels(*labels, "status").inc()
            if response.status_code in RETRIED_STATUSES and attempt == 0:
                metrics.requests.labels(*labels, "retried").inc()
                last = error
                continue
            metrics.requests.labels(*labels, "error").inc()
            raise error
        if last is not None:
            raise last
        raise NoHealthyUpstreamError(
            f"No upstream server is available (0 of {len(engine.pool.upstreams)} healthy); "
            "retry in a few seconds.")

    def _release(self) -> None:
        if self.upstream is not None:
            self.engine.pool.release(self.upstream)
            self.engine.upstream_metrics.latency.labels(
                *self.engine.upstream_metrics.labels(self.upstream)).observe(
                time.monotonic() - self._opened_at)
            self.upstream = None

    def _timed_out(self) -> GenerationTimeoutError:
        return GenerationTimeoutError(
            f"generation did not finish within the {self.engine.settings.request_timeout_s:g}s "
            "request deadline (THAI_REQUEST_TIMEOUT_S)")

    # ------------------------------------------------------------ iterating
    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout(self._deadline - time.monotonic()):
                return await self._advance()
        except TimeoutError as exc:
            self._count_failure(exc, "error")
            await self.aclose()
            raise self._timed_out() from None
        except BaseException:
            await self.aclose()
            raise

    async def _advance(self) -> GenerationChunk:
        while True:
            if self._response is None:
                await self._open()
            try:
                chunk = await self._next_chunk()
            except UpstreamTooLargeError as exc:
                self._count_failure(exc, "error")
                raise
            except (httpx.HTTPError, UpstreamError) as exc:
                if self._text or len(self.tried) >= 2 or not self._can_retry():
                    raise self._broken(exc) from exc
                self._count_failure(exc, "retried")
                await self._drop_response()
                continue
            if chunk is not None:
                return chunk

    def _can_retry(self) -> bool:
        return self.engine.pool.pick(exclude=self.tried[-1]) is not None

    async def _next_chunk(self) -> GenerationChunk | None:
        """Read events until there is something to hand on (text or the end)."""
        assert self._events is not None
        async for event in self._events:
            if event is DONE:
                return self._finish()
            if isinstance(event.get("error"), dict):
                raise event_error(event["error"])
            if isinstance(event.get("usage"), dict):
                self._usage = event["usage"]
            text = ""
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                # a text completion's choice carries ``text``; a chat chunk's, ``delta.content``
                plain = self.request.plain_prompt
                delta, key = (choice, "text") if plain else (choice.get("delta"), "content")
                if isinstance(delta, dict) and isinstance(delta.get(key), str):
                    text += delta[key]
                if choice.get("finish_reason"):
                    self._finish_reason = choice["finish_reason"]
            if text:
                return self._text_chunk(text)
        if self._finish_reason is None:  # the connection ended without [DONE] or a finish
            raise UpstreamError("The model server closed the stream before the generation finished.")
        return self._finish()

    def _text_chunk(self, text: str) -> GenerationChunk:
        self._chars += len(text)
        if self._chars > self._max_chars:
            raise UpstreamTooLargeError(
                f"The model server sent more text than max_tokens "
                f"({self.request.params.max_tokens}) allows (over {self._max_chars} characters).")
        now = time.monotonic()
        if self._first_text_at is None:
            self._first_text_at = now
            self.engine.metrics.ttft.observe(now - self._arrived)
        self._text.append(text)
        self._chunks += 1
        return GenerationChunk(text, len(self.request.prompt_ids), self._chunks)

    def _finish(self) -> GenerationChunk:
        usage = self._usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # servers that send no usage (or an impossible one): count it ourselves
        if not isinstance(prompt, int) or not 0 <= prompt <= self.engine.info.max_context:
            prompt = len(self.request.prompt_ids)
        if not isinstance(completion, int) or not 0 <= completion <= self.request.params.max_tokens:
            completion = self.engine.count_tokens("".join(self._text))
        reason = self._finish_reason if self._finish_reason in ("stop", "length") else "stop"
        metrics, upstream = self.engine.metrics, self.upstream
        metrics.prompt_tokens.inc(prompt)
        metrics.generation_tokens.inc(completion)
        metrics.e2e.observe(time.monotonic() - self._arrived)
        metrics.finished(reason)
        if upstream is not None:
            self.engine.upstream_metrics.requests.labels(
                *self.engine.upstream_metrics.labels(upstream), "ok").inc()
        self._done = True
        return GenerationChunk("", prompt, completion, finished=True, finish_reason=reason)

    def _count_failure(self, exc: BaseException, outcome: str) -> None:
        if self.upstream is None:
            return
        labels = self.engine.upstream_metrics.labels(self.upstream)
        timeout = isinstance(exc, (httpx.TimeoutException, TimeoutError))
        self.engine.upstream_metrics.errors.labels(*labels, "timeout" if timeout else "stream").inc()
        self.engine.upstream_metrics.requests.labels(*labels, outcome).inc()
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
            self.engine.pool.mark(self.upstream, False, describe(exc))

    def _broken(self, exc: BaseException) -> BaseException:
        self._count_failure(exc, "error")
        if isinstance(exc, UpstreamError):
            return exc
        where = "after part of the answer was sent" if self._text else "before answering"
        return UpstreamError(f"The model server failed {where} ({describe(exc)}).")

    async def _drop_response(self) -> None:
        response, self._response = self._response, None
        events_, self._events = self._events, None
        if events_ is not None:
            await events_.aclose()
        if response is not None:
            await response.aclose()
        self._release()

    async def aclose(self) -> None:
        if self._response is not None and not self._done and self.upstream is not None:
            self.engine.upstream_metrics.requests.labels(
                *self.engine.upstream_metrics.labels(self.upstream), "cancelled").inc()
        self._done = True
        await self._drop_response()
