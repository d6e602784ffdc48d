"""A keyed API request against a flood of anonymous UI work, on a real server.

The engine's batch has 4 rows. One anonymous visitor queues ten 300-token summaries
through the UI's queue; once 4 run and the rest wait, a keyed chat is sent. It must be
admitted ahead of the queued anonymous work: when its answer arrives, anonymous summaries
that were queued before it are still waiting (first come, first served would have run all
of them first). Counted from the engine's gauges, not timed.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import start_server

KEY = "tenant-live-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
UI = "/ui/gradio_api"
FLOOD = 10


@pytest.fixture(scope="module")
def small_batch_server(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_MAX_BATCH_SIZE": "4", "THAI_ENABLE_UI": "true",
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "100000", "THAI_UI_RATE_LIMIT_BURST": "100000"}
    server = start_server(env, tmp_path_factory.mktemp("tenants-live"))
    yield server
    server.stop()


def engine_gauges(url: str) -> tuple[int, int]:
    """(running, waiting) from /metrics."""
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in ("running", "waiting"):
            if line.startswith(f"thai:num_requests_{name}{{"):
                values[name] = int(float(line.rsplit(" ", 1)[1]))
    return values["running"], values["waiting"]


def test_keyed_request_is_admitted_ahead_of_queued_anonymous_ui_work(small_batch_server):
    url = small_batch_server.url
    config = httpx.get(url + "/ui/config", timeout=30).json()
    summarize = next(d for d in config["dependencies"] if d.get("api_name") == "summarize")
    for i in range(FLOOD):  # one anonymous visitor (one address), one session; greedy: no EOS
        r = httpx.post(f"{url}{UI}/queue/join", timeout=30, json={
            "fn_index": summarize["id"], "data": [f"ข่าววันนี้ ฝนตกหนักในกรุงเทพ ฉบับที่ {i}", 300, 0.0],
            "session_hash": "one-visitor", "event_data": None, "trigger_id": None})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    running, waiting = engine_gauges(url)
    while (running, waiting) != (4, FLOOD - 4) and time.monotonic() < deadline:
        time.sleep(0.2)
        running, waiting = engine_gauges(url)
    assert (running, waiting) == (4, FLOOD - 4), "the flood fills the batch and queues the rest"

    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=300, json={
        "messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 8, "min_tokens": 8,
        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    running, waiting = engine_gauges(url)
    # The keyed chat took the first row that freed (the UI, at its share, waited); the rows
    # freed with it went to anonymous work, whose rest still waits behind the keyed answer.
    assert waiting >= 1, (running, waiting)
