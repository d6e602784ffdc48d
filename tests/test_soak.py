"""A bounded soak: twice the engine's capacity for a fixed time on loopback.

The server is given a small capacity (2 running + 2 waiting); twice as many
clients send chat, streamed chat and summarize requests back to back (pausing
50-250 ms after a refusal), and some streams are abandoned after their first
chunk. Every request must end as
a complete 200 (a full JSON answer, or a stream with its finish reason and
``[DONE]``) or a 429/503 with an error body: nothing lost. The server's RSS
after a warm-up and at the end must not grow beyond a bound. The soak stops by
itself after ``THAI_SOAK_SECONDS`` (default 60); figures go to
test-artifacts/soak.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import httpx
import psutil
import pytest

from tests.support import ARTIFACTS, start_server

BATCH, WAITING = 2, 2
CLIENTS = 2 * (BATCH + WAITING)
SOAK_SECONDS = float(os.environ.get("THAI_SOAK_SECONDS", "60"))
RSS_GROWTH_LIMIT_MB = 96.0
TEXTS = ["สวัสดีครับ วันนี้อากาศดีมาก", "ประชุม AI 🤖 วันจันทร์ meeting at 10:00",
         "เศรษฐกิจไทยไตรมาสนี้ขยายตัวจากการท่องเที่ยวและการส่งออก", "hello สบายดีไหม 👍🏽"]


def refused(response: httpx.Response) -> bool:
    """A 429/503 that says why in OpenAI's error shape."""
    if response.status_code not in (429, 503):
        return False
    error = response.json().get("error", {})
    return bool(error.get("message")) and bool(error.get("type"))


async def one_request(client: httpx.AsyncClient, rng: random.Random) -> str:
    kind = rng.choice(["chat", "chat", "stream", "stream", "summarize", "abandon"])
    max_tokens = rng.randint(4, 40)
    text = rng.choice(TEXTS)
    if kind == "summarize":
        r = await client.post("/v1/summarize", json={"text": text, "max_tokens": max_tokens})
        if r.status_code == 200:
            body = r.json()
            ok = body["finish_reason"] in ("stop", "length") and body["usage"]["output_tokens"] >= 1
            return "completed" if ok else "lost"
        return "refused" if refused(r) else f"lost_{r.status_code}"
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            choice = r.json()["choices"][0]
            return "completed" if choice["finish_reason"] in ("stop", "length") else "lost"
        return "refused" if refused(r) else f"lost_{r.status_code}"
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return "refused" if refused(r) else f"lost_{r.status_code}"
        finish, done = None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if kind == "abandon":
                return "abandoned"  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return "lost_stream_error"
            for choice in event["choices"]:
                finish = choice.get("finish_reason") or finish
        return "completed" if done and finish in ("stop", "length") else "lost_truncated"


async def soak(url: str, seconds: float) -> Counter:
    outcomes: Counter = Counter()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                try:
                    outcome = await one_request(client, rng)
                except Exception as exc:  # a reset, a timeout, a bad body: a lost request
                    outcome = f"lost_{type(exc).__name__}"
                outcomes[outcome] += 1
                outcomes["sent"] += 1
                if outcome == "refused":  # a polite client backs off briefly, then retries
                    await asyncio.sleep(rng.uniform(0.05, 0.25))

        await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    return outcomes


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_soak_twice_capacity_loses_nothing(model_env, tmp_path):
    env = {**model_env, "THAI_ENABLE_UI": "false", "THAI_MAX_BATCH_SIZE": str(BATCH),
           "THAI_MAX_WAITING": str(WAITING), "THAI_ACCESS_LOG": "false"}
    server = start_server(env, tmp_path)
    try:
        process = psutil.Process(server.pid)
        asyncio.run(soak(server.url, min(10.0, SOAK_SECONDS / 4)))  # warm-up: caches, allocator
        rss_start = process.memory_info().rss / 2**20
        outcomes = asyncio.run(soak(server.url, SOAK_SECONDS))
        time.sleep(1.0)  # abandoned streams are reaped at the engine's next step
        rss_end = process.memory_info().rss / 2**20
        health = httpx.get(server.url + "/health", timeout=10).json()
    finally:
        server.stop()
    lost = {k: v for k, v in outcomes.items() if k.startswith("lost")}
    report = {"seconds": SOAK_SECONDS, "clients": CLIENTS, "capacity": BATCH + WAITING,
              "sent": outcomes["sent"], "completed": outcomes["completed"],
              "refused": outcomes["refused"], "abandoned": outcomes["abandoned"],
              "lost": sum(lost.values()), "lost_by_kind": lost,
              "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak.json").write_text(json.dumps(report, indent=2))
    print("soak:", report)
    assert report["lost"] == 0, report
    assert report["sent"] == report["completed"] + report["refused"] + report["abandoned"]
    assert report["completed"] > 0 and report["refused"] > 0, "the soak should reach the queue limit"
    assert health["requests_running"] == 0 and health["requests_waiting"] == 0, health
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_MB, report
