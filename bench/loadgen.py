"""Drive an OpenAI-compatible server with streaming chat requests at a fixed concurrency.

Each of ``concurrency`` workers sends requests back to back until the level's
request count is used up. For every request we record the time to the first
content chunk (TTFT), the gaps between content chunks (ITL, as vLLM's
benchmark does), the completion tokens (from ``usage``, which both our server
and ``transformers serve`` put on the last chunk) and any error. Errors are
counted, never fatal: a timeout, an HTTP 429 or a broken stream is one failed
request and the level goes on.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from bench.workload import messages


@dataclass
class RequestRecord:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str | None = None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    completed: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    mean_tokens_per_request: float
    error_samples: list[str]

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


async def sse_events(response: httpx.Response):
    """The JSON events of an OpenAI-style SSE stream, until ``data: [DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> RequestRecord:
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens, content_chunks = 0, 0
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:200]
                    return RequestRecord(False, latency=time.perf_counter() - start,
                                         error=f"HTTP {response.status_code}: {text}")
                async for event in sse_events(response):
                    if "error" in event:
                        return RequestRecord(False, latency=time.perf_counter() - start,
                                             error=f"stream error: {event['error'].get('message')}")
                    usage = event.get("usage")
                    if usage:
                        tokens = int(usage.get("completion_tokens") or 0)
                    for choice in event.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                            content_chunks += 1
    except (httpx.HTTPError, TimeoutError, json.JSONDecodeError, OSError) as exc:
        return RequestRecord(False, latency=time.perf_counter() - start,
                             error=f"{type(exc).__name__}: {exc}"[:200])
    if first is None:
        return RequestRecord(False, latency=time.perf_counter() - start, error="no content streamed")
    return RequestRecord(True, tokens=tokens or content_chunks, ttft=first - start, gaps=gaps,
                         latency=time.perf_counter() - start)


async def run_level(system: str, url: str, *, concurrency: int, num_requests: int,
                    body_for, timeout_s: float, budget_s: float | None = None) -> LevelResult:
    """``body_for(i)`` gives the JSON body of request ``i``. After ``budget_s`` seconds
    no new request starts (a slow system then sends fewer; throughput stays comparable)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    records: list[RequestRecord] = []
    counter = iter(range(num_requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:
        start = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    return
                records.append(await stream_one(client, url, body_for(i), timeout_s))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return summarize(system, concurrency, records, duration)


def summarize(system: str, concurrency: int, records: list[RequestRecord], duration: float) -> LevelResult:
    done = [r for r in records if r.ok]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    gaps = [g for r in done for g in r.gaps]
    tokens = sum(r.tokens for r in done)
    errors = [r.error or "?" for r in records if not r.ok]
    return LevelResult(
        system=system, concurrency=concurrency, requests=len(records), completed=len(done),
        errors=len(errors), duration_s=round(duration, 3),
        requests_per_s=round(len(done) / duration, 3) if duration else 0.0,
        output_tokens=tokens,
        output_tokens_per_s=round(tokens / duration, 2) if duration else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p99_ms=_ms(percentile(ttfts, 99)),
        itl_p50_ms=_ms(percentile(gaps, 50)), itl_p99_ms=_ms(percentile(gaps, 99)),
        mean_tokens_per_request=round(statistics.fmean([r.tokens for r in done]), 1) if done else 0.0,
        error_samples=sorted(set(errors))[:3],
    )


# The structured-output row's schema: records with bounded fields, at least 8 of them, so
# every reply runs to max_tokens like the plain row's (the same token count per request).
STRUCTURED_SCHEMA = {"type": "object", "properties": {"records": {
    "type": "array", "minItems": 8, "maxItems": 64, "items": {
    "type": "object", "properties": {
        "province": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "region": {"enum": ["เหนือ", "ใต้", "อีสาน", "กลาง", "ตะวันออก", "ตะวันตก"]}},
    "required": ["province", "population", "region"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def structured_body(model: str, max_tokens: int):
    """Our server's fixed-length body with ``response_format`` json_schema (the schema's
    minimum is longer than ``max_tokens``, so replies are as long as the plain ones)."""
    plain = chat_body(model, max_tokens, fixed_length=True)

    def body_for(i: int) -> dict:
        return {**plain(i), "response_format": {"type": "json_schema", "json_schema": {
            "name": "provinces", "schema": STRUCTURED_SCHEMA, "strict": True}}}
    return body_for


def chat_body(model: str, max_tokens: int, *, fixed_length: bool):
    """Request bodies: ours gets vLLM's fixed-length fields, a peer standard fields only."""
    def body_for(i: int) -> dict:
        body = {"model": model, "messages": messages(i), "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if fixed_length:
            body.update(min_tokens=max_tokens, ignore_eos=True, no_repeat_ngram_size=0)
        return body
    return body_for
