"""Back-pressure over real HTTP: past the running + waiting limits the server answers
429 with Retry-After and an OpenAI error body at once, instead of queuing forever ("at
once": while the request holding the only slot is still streaming, not after it)."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import ARTIFACTS, start_server

LONG = {"max_tokens": 2000, "min_tokens": 2000, "ignore_eos": True, "temperature": 0.0,
        "no_repeat_ngram_size": 0}


def test_overload_answers_429_with_retry_after_instantly(model_env):
    env = {**model_env, "THAI_MAX_BATCH_SIZE": "1", "THAI_MAX_WAITING": "0",
           "THAI_ENABLE_UI": "false", "THAI_RATE_LIMIT_PER_MINUTE": "0",
           # one OpenMP thread: on a busy shared CPU, spinning threads slow every step
           "OMP_NUM_THREADS": "1"}
    server = start_server(env, ARTIFACTS / "overload")

    async def long_stream(client: httpx.AsyncClient, started: asyncio.Event) -> int:
        body = {"messages": [{"role": "user", "content": "สวัสดี"}], "stream": True, **LONG}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    started.set()  # the request holds the only slot; keep reading to hold it
            return response.status_code

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            started = asyncio.Event()
            holder = asyncio.create_task(long_stream(client, started))
            waiter = asyncio.create_task(started.wait())
            await asyncio.wait({holder, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if holder.done():
                holder.result()  # re-raise why the long request did not stream
                raise AssertionError("the long request ended before the overload was tested")
            assert started.is_set(), "the long request never started streaming"
            responses = []
            for _ in range(3):
                responses.append(await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "ขอบคุณ"}], **LONG}))
            streamed = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "ขอบคุณ"}], "stream": True, **LONG})
            # answered while the slot's holder still streams (2,000 tokens): not queued behind it
            held = not holder.done()
            holder.cancel()
            waiter.cancel()
            return responses + [streamed], held, await _metrics(client)

    try:
        responses, held, metrics = asyncio.run(main())
    finally:
        server.stop()
    for response in responses:
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["type"] and error["message"] and "capacity" in error["message"]
        assert set(error) >= {"message", "type", "param", "code"}
    assert held, "the refusals should come while the only slot is still held"
    assert "thai:num_requests_running" in metrics


async def _metrics(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    return response.text if response.status_code == 200 else ""
