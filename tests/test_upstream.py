"""THAI_ENGINE=openai: this app in front of real upstreams.

Two replicas of this app (local engine, the generated checkpoint) on loopback and
``transformers serve`` as a third kind; the front app loads only the tokenizer.
Covers chat (plain, streamed), summarize, the UI through ``gradio_client``, usage
equal to the upstream's, balancing (each replica's own metrics), a replica killed
mid-load, both killed, and one restarted.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from bench.upstream_hop import metric
from tests.support import REPO, ServerProcess, free_port, start_server

HEALTH_INTERVAL_S = 0.3
MESSAGES = [{"role": "user", "content": "สรุปประโยชน์ของการออกกำลังกาย"}]


def replica_env(model_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**model_env, "THAI_ENABLE_UI": "false", "THAI_METRICS_PUBLIC": "true",
            "THAI_RATE_LIMIT_PER_MINUTE": "0", "THAI_ACCESS_LOG": "false", **extra}


def front_env(model_env: dict[str, str], urls: list[str], **extra: str) -> dict[str, str]:
    base = model_env["THAI_BASE_MODEL"]
    return {"THAI_ENGINE": "openai", "THAI_UPSTREAM_URLS": ",".join(urls),
            "THAI_TOKENIZER": model_env["THAI_LORA_PATH"], "THAI_BASE_MODEL": base,
            "THAI_LORA_PATH": model_env["THAI_LORA_PATH"], "THAI_METRICS_PUBLIC": "true",
            "THAI_UPSTREAM_HEALTH_INTERVAL_S": str(HEALTH_INTERVAL_S),
            "THAI_RATE_LIMIT_PER_MINUTE": "0", "THAI_REQUIRE_MODEL": "true", **extra}


def served(url: str) -> float:
    return metric(url, "thai:request_success_total")


def wait_for(predicate, timeout: float = 30, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def upstream_health(front: ServerProcess) -> list[dict]:
    return httpx.get(front.url + "/health", timeout=5).json()["upstreams"]


@pytest.fixture(scope="module")
def fleet(model_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("upstream-logs")
    replicas = [start_server(replica_env(model_env), logs) for _ in range(2)]
    front = start_server(front_env(model_env, [r.url for r in replicas]), logs)
    yield front, replicas, logs
    for server in (front, *replicas):
        server.stop()


def test_chat_plain_and_streamed_match_the_upstream(fleet):
    front, replicas, _ = fleet
    ours = openai.OpenAI(base_url=front.url + "/v1", api_key="x")
    direct = openai.OpenAI(base_url=replicas[0].url + "/v1", api_key="x")
    kwargs = dict(model="thai-qwen-lora", messages=MESSAGES, max_tokens=16, temperature=0)
    via_front, via_replica = ours.chat.completions.create(**kwargs), direct.chat.completions.create(**kwargs)
    assert via_front.choices[0].message.content == via_replica.choices[0].message.content
    assert via_front.usage == via_replica.usage
    assert via_front.choices[0].finish_reason == via_replica.choices[0].finish_reason

    chunks = list(ours.chat.completions.create(**kwargs, stream=True,
                                               stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == via_replica.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2, "relayed in parts"
    assert chunks[-1].usage == via_replica.usage


def test_health_names_upstreams_without_their_addresses(fleet):
    front, replicas, _ = fleet
    body = httpx.get(front.url + "/health").json()
    assert body["engine"] == "openai" and body["status"] == "ok"
    assert [u["name"] for u in body["upstreams"]] == ["upstream-0", "upstream-1"]
    assert all(u["healthy"] for u in body["upstreams"])
    text = json.dumps(body)
    assert all(r.url.split("//")[1] not in text for r in replicas)
    assert httpx.get(front.url + "/ready").status_code == 200


def test_summarize_and_the_ui_through_the_front(fleet):
    from gradio_client import Client

    front, replicas, _ = fleet
    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8")
    body = {"text": text, "max_tokens": 12, "temperature": 0}
    via_front = httpx.post(front.url + "/v1/summarize", json=body, timeout=60)
    via_replica = httpx.post(replicas[1].url + "/v1/summarize", json=body, timeout=60)
    assert via_front.status_code == 200, via_front.text
    assert via_front.json()["summary"] == via_replica.json()["summary"]
    assert via_front.json()["usage"] == via_replica.json()["usage"]

    # a long text: the front splits it (its tokenizer), the pieces go to both replicas at once
    long_text = (REPO / "assets" / "thai_corpus.txt").read_text(encoding="utf-8")[:20000]
    before = [served(r.url) for r in replicas]
    long = httpx.post(front.url + "/v1/summarize", timeout=120,
                      json={"text": long_text, "max_tokens": 16, "temperature": 0})
    assert long.status_code == 200, long.text
    result = long.json()
    assert result["chunks"] > 2 and result["rounds"] >= 2 and result["summary"]
    shares = [served(r.url) - b for r, b in zip(replicas, before)]
    assert sum(shares) == result["chunks"] and min(shares) >= 1, shares
    assert result["usage"]["input_tokens"] > 20000 // 8

    ui = Client(front.url + "/ui/", verbose=False, download_files=False)
    summary, usage = ui.predict(text, 12, 0.0, api_name="/summarize")
    assert summary == via_replica.json()["summary"]
    assert "เสร็จ / done" in usage


def test_request_id_and_extra_fields_reach_the_upstream(fleet):
    front, replicas, logs = fleet
    response = httpx.post(front.url + "/v1/chat/completions", headers={"X-Request-ID": "trace-me-123"},
                          json={"messages": MESSAGES, "max_tokens": 4, "no_repeat_ngram_size": 0},
                          timeout=30)
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-me-123"
    # the replica that served it logged our id (its access log is off; its engine log is not)
    replica_logs = "".join(r.log() for r in replicas)
    front_log = front.log()
    assert "trace-me-123" in front_log
    assert "trace-me-123" in replica_logs or "trace-me-123" in front_log


def test_upstream_errors_pass_through_with_their_status(fleet):
    front, _, _ = fleet
    too_long = httpx.post(front.url + "/v1/chat/completions", timeout=30, json={
        "messages": MESSAGES, "max_tokens": 5000})
    assert too_long.status_code == 400
    wrong_min = httpx.post(front.url + "/v1/chat/completions", timeout=30, json={
        "messages": MESSAGES, "max_tokens": 4, "min_tokens": 8})
    assert wrong_min.status_code == 400 and wrong_min.json()["error"]["param"] == "min_tokens"


def test_load_spreads_over_both_replicas(fleet):
    front, replicas, _ = fleet
    before = [served(r.url) for r in replicas]

    def call(i: int) -> int:
        return httpx.post(front.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"ข้อ {i}"}], "max_tokens": 24,
            "ignore_eos": True}).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(32)))
    assert statuses == [200] * 32
    shares = [served(r.url) - b for r, b in zip(replicas, before)]
    assert sum(shares) == 32 and min(shares) >= 8, shares  # least-outstanding keeps them even


def _stream(url: str, i: int, max_tokens: int, results: list, started: threading.Event) -> None:
    """One streamed chat; records (saw text, finished normally, error event)."""
    saw_text = finished = False
    error = None
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=180, json={
                "messages": [{"role": "user", "content": f"เล่าเรื่อง {i}"}], "stream": True,
                "max_tokens": max_tokens, "ignore_eos": True}) as response:
            if response.status_code != 200:
                results.append(("status", response.status_code))
                return
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    if choice["delta"].get("content"):
                        saw_text = True
                        started.set()
                    if choice.get("finish_reason"):
                        finished = True
    except httpx.HTTPError as exc:
        results.append(("transport", repr(exc)))
        return
    results.append(("stream", saw_text, finished, error))


@pytest.fixture
def slow_fleet(model_env, tmp_path_factory):
    """Replicas that take one sequence at a time, so most requests wait in a replica's queue."""
    logs = tmp_path_factory.mktemp("upstream-kill")
    env = replica_env(model_env, THAI_MAX_BATCH_SIZE="1", THAI_PREFIX_CACHING="false")
    replicas = [start_server(env, logs) for _ in range(2)]
    front = start_server(front_env(model_env, [r.url for r in replicas]), logs)
    yield front, replicas, env, logs
    for server in (front, *replicas):
        server.stop()


def test_killing_a_replica_mid_load(slow_fleet):
    front, replicas, env, logs = slow_fleet
    results: list = []
    started = threading.Event()
    threads = [threading.Thread(target=_stream, args=(front.url, i, 96, results, started))
               for i in range(12)]
    for thread in threads:
        thread.start()
    assert started.wait(30), "no stream started"
    replicas[0].stop(signal.SIGKILL)
    for thread in threads:
        thread.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(results) == 12 and all(r[0] == "stream" for r in results), results
    completed = [r for r in results if r[2] and r[3] is None]
    broken = [r for r in results if r[3] is not None]
    assert len(completed) + len(broken) == 12, results
    assert all(r[1] for r in broken), "only a stream that had started may end in an error"
    assert all("failed after part of the answer" in r[3]["message"] for r in broken), broken
    assert len(broken) <= 1, "one slot on the killed replica: at most one stream was running there"
    retried = metric(front.url, "thai:upstream_requests_total", upstream="0", outcome="retried")
    assert retried >= 1, "the requests queued on the killed replica should have moved"
    wait_for(lambda: not upstream_health(front)[0]["healthy"], message="replica 0 marked down")

    # both down: clean 503s, readiness fails, nothing hangs
    replicas[1].stop(signal.SIGKILL)
    wait_for(lambda: httpx.get(front.url + "/ready").status_code == 503, message="front not ready")
    # nothing hangs: the front answers from its health state (the code says so), no retries
    down = httpx.post(front.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4},
                      timeout=60)
    assert down.status_code == 503 and down.headers["retry-after"]
    assert down.json()["error"]["code"] == "no_healthy_upstream"
    streamed = httpx.post(front.url + "/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 4, "stream": True}, timeout=60)
    assert streamed.status_code == 503

    # one comes back (same port): traffic returns to it
    port = int(replicas[1].url.rsplit(":", 1)[1])
    back = start_server(env, logs, port=port)
    try:
        wait_for(lambda: httpx.get(front.url + "/ready").status_code == 200, message="front ready again")
        ok = httpx.post(front.url + "/v1/chat/completions", timeout=30,
                        json={"messages": MESSAGES, "max_tokens": 4})
        assert ok.status_code == 200
        assert served(back.url) == 1
    finally:
        back.stop()


def test_transformers_serve_as_an_upstream(model_env, tmp_path_factory):
    """A third kind of upstream: transformers' own OpenAI-compatible server."""
    logs = tmp_path_factory.mktemp("upstream-tserve")
    base = model_env["THAI_BASE_MODEL"]
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    log_path = logs / "transformers-serve.log"
    import subprocess

    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([str(exe), "serve", base, "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
                                stdout=log_file, stderr=subprocess.STDOUT,
                                env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    tserve = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for(lambda: _answers(tserve.url + "/health"), timeout=120, message="transformers serve")
        front = start_server(front_env(model_env, [tserve.url], THAI_UPSTREAM_MODEL=base,
                                       THAI_ENABLE_UI="false"), logs)
        try:
            client = openai.OpenAI(base_url=front.url + "/v1", api_key="x")
            reply = client.chat.completions.create(model="thai-qwen-lora", messages=MESSAGES,
                                                   max_tokens=8, temperature=0)
            assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
            direct = openai.OpenAI(base_url=tserve.url + "/v1", api_key="x").chat.completions.create(
                model=base, messages=MESSAGES, max_tokens=8, temperature=0)
            assert reply.choices[0].message.content == direct.choices[0].message.content
            chunks = list(client.chat.completions.create(
                model="thai-qwen-lora", messages=MESSAGES, max_tokens=8, temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                direct.choices[0].message.content
            # a field no schema here declares is refused here, before any upstream sees it
            refused = httpx.post(front.url + "/v1/chat/completions", timeout=30, json={
                "messages": MESSAGES, "max_tokens": 4, "not_a_field": 1})
            assert refused.status_code == 400 and "not_a_field" in refused.json()["error"]["message"]
        finally:
            front.stop()
    finally:
        tserve.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_upstream_429_passes_through_and_a_wrong_key_is_a_gateway_error(model_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("upstream-status")
    replica = start_server(replica_env(model_env, THAI_API_KEYS="upstream-key-1234567",
                                       THAI_RATE_LIMIT_PER_MINUTE="1", THAI_RATE_LIMIT_BURST="2"), logs)
    # burst 2: the good front reads /v1/models once (for max_model_len), then one chat passes
    good = start_server(front_env(model_env, [replica.url], THAI_ENABLE_UI="false",
                                  THAI_UPSTREAM_API_KEY="upstream-key-1234567",
                                  THAI_UPSTREAM_HEALTH_PATH="/ready"), logs)
    bad = start_server(front_env(model_env, [replica.url], THAI_ENABLE_UI="false",
                                 THAI_UPSTREAM_API_KEY="wrong-key-000000000",
                                 THAI_UPSTREAM_HEALTH_PATH="/ready"), logs)
    try:
        body = {"messages": MESSAGES, "max_tokens": 4}
        refused = httpx.post(bad.url + "/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 502
        assert refused.json()["error"]["code"] == "upstream_auth_failed"
        assert "wrong-key" not in refused.text

        first = httpx.post(good.url + "/v1/chat/completions", json=body, timeout=30)
        assert first.status_code == 200
        # the bucket refills one a minute: on a busy machine the fronts' starts may have
        # taken that long, so the replica's 429 comes within a few more chats, not the next
        for _ in range(4):
            limited = httpx.post(good.url + "/v1/chat/completions", json=body, timeout=30)
            if limited.status_code != 200:
                break
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        streamed = httpx.post(good.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert streamed.status_code == 429 and streamed.headers["retry-after"]
        assert "error" in streamed.json()
    finally:
        for server in (good, bad, replica):
            server.stop()
