"""THAI_ENGINE=openai in front of a hostile upstream (tests/hostile_upstream.py): the front's
memory stays flat whatever the upstream sends (peak RSS from /proc, not timings), every
request ends with the right status or error event, and what the upstream says about its
errors reaches the client cleaned and cut. Fields the front does not declare never reach
the upstream at all.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from api.engine.upstream_http import MAX_UPSTREAM_MESSAGE_CHARS
from api.protocol import SamplingFields
from tests.hostile_upstream import HUGE, HostileUpstream
from tests.support import ServerProcess, start_server

DEADLINE_S = 3  # the front's THAI_REQUEST_TIMEOUT_S: small, so a stalled stream ends soon
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
MiB = 1024 * 1024
BOUND_MIB = 32  # the most the front's peak RSS may rise during an attack: a quarter of HUGE
# What the front may send an upstream: its own request fields and the declared vLLM ones.
OWN_FIELDS = {"model", "messages", "prompt", "max_tokens", "temperature", "top_p", "stream",
              "stream_options", "seed", "stop", "min_tokens", "ignore_eos", "no_repeat_ngram_size"}


@pytest.fixture(scope="module")
def hostile(model_env, tmp_path_factory):
    upstream = HostileUpstream().start()
    front = start_server({
        "THAI_ENGINE": "openai", "THAI_UPSTREAM_URLS": upstream.url,
        "THAI_TOKENIZER": model_env["THAI_LORA_PATH"], "THAI_BASE_MODEL": model_env["THAI_BASE_MODEL"],
        "THAI_LORA_PATH": model_env["THAI_LORA_PATH"], "THAI_ENABLE_UI": "false",
        "THAI_UPSTREAM_HEALTH_INTERVAL_S": "0.2", "THAI_RATE_LIMIT_PER_MINUTE": "0",
        "THAI_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "THAI_UPSTREAM_MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES)},
        tmp_path_factory.mktemp("hostile-logs"))
    try:
        # warm: first-request imports and the error paths' first allocations happen now
        assert chat(front, "ok").status_code == 200
        assert chat(front, "huge-line").status_code == 502
        yield front, upstream
    finally:
        front.stop()
        upstream.stop()


def chat(front: ServerProcess, behaviour: str, **extra) -> httpx.Response:
    return httpx.post(front.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": behaviour}], "max_tokens": 8, **extra})


def streamed(front: ServerProcess, behaviour: str) -> tuple[int, str, list[dict]]:
    """Status, the text relayed, and the error events of a streamed chat (ends with [DONE])."""
    with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": behaviour}], "max_tokens": 8,
            "stream": True}) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    if response.status_code != 200:
        return response.status_code, "", []
    assert lines[-1] == "[DONE]", lines[-3:]
    events = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    return response.status_code, text, [e["error"] for e in events if "error" in e]


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def peak_growth_mib(pid: int, attack) -> float:
    """How far the process's peak RSS rose above its RSS before ``attack`` ran: the kernel's
    high-water mark, reset first (/proc/<pid>/clear_refs, "5"); where that is not allowed,
    the highest RSS seen by sampling every 5 ms while the attack runs."""
    before = status_kib(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        seen, done = [before], threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                seen.append(status_kib(pid, "VmRSS"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            attack()
        finally:
            done.set()
            sampler.join()
        peak = max(seen)
    else:
        attack()
        peak = status_kib(pid, "VmHWM")
    grown = (peak - before) / 1024
    print(f"peak RSS growth of the front: {grown:.1f} MiB")  # shown with pytest -s
    return grown


def test_fields_it_does_not_declare_never_reach_the_upstream(hostile):
    front, upstream = hostile
    seen = len(upstream.received)
    for name, value in (("best_of", 64), ("prompt_logprobs", 20), ("priority", -1000000),
                        ("chat_template", "{{ 7 * 7 }}"), ("logits_processors", ["m:P"]),
                        ("lora_request", {"lora_name": "x", "lora_int_id": 1, "lora_path": "/"})):
        response = chat(front, "ok", **{name: value})
        assert response.status_code == 400, (name, response.text)
        assert name in response.json()["error"]["message"]
    refused = httpx.post(front.url + "/v1/completions", timeout=30, json={
        "prompt": "สวัสดี", "max_tokens": 4, "best_of": 64})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"
    assert len(upstream.received) == seen, "a refused request reached the upstream"

    accepted = chat(front, "ok", top_k=5, min_p=0.1, repetition_penalty=1.2, stop_token_ids=[3],
                    include_stop_str_in_output=True, user="someone")
    assert accepted.status_code == 200, accepted.text
    _, body = upstream.received[-1]
    assert set(body) <= OWN_FIELDS | set(SamplingFields.PASSED_ON), body
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.2 and "user" not in body


def test_huge_error_and_health_bodies_leave_the_fronts_memory_flat(hostile):
    front, upstream = hostile
    results = {}

    def attack():
        results["error"] = chat(front, "huge-error")
        upstream.health = "huge"
        probes = upstream.health_probes
        deadline = time.monotonic() + 60
        while upstream.health_probes < probes + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        upstream.health = "ok"
        results["probes"] = upstream.health_probes - probes

    grown = peak_growth_mib(front.pid, attack)
    assert results["probes"] >= 3
    error = results["error"]
    assert error.status_code == 400
    assert error.json()["error"]["message"] == "The model server answered HTTP 400."
    assert grown < BOUND_MIB, f"peak RSS grew {grown:.1f} MiB for {HUGE // MiB} MiB bodies"
    # the front stopped reading: no more than the socket buffers took of each 64 MiB body
    assert upstream.sent["huge-error"] < HUGE // 2 and upstream.sent["health"] < 3 * HUGE // 2
    health = httpx.get(front.url + "/health", timeout=10).json()
    assert health["upstreams"][0]["healthy"], "a 200 with a huge body still answers the probe"


def test_an_endless_stream_is_cut_at_what_max_tokens_allows(hostile, model_env):
    from transformers import AutoTokenizer

    from api.engine.upstream_engine import longest_token_chars

    front, _ = hostile
    tokenizer = AutoTokenizer.from_pretrained(model_env["THAI_LORA_PATH"])
    most = 8 * longest_token_chars(tokenizer)
    results = {}

    def attack():
        results["plain"] = chat(front, "endless")
        results["streamed"] = streamed(front, "endless")

    grown = peak_growth_mib(front.pid, attack)
    plain = results["plain"]
    assert plain.status_code == 502, plain.text
    assert plain.json()["error"]["code"] == "upstream_response_too_large"
    status, text, errors = results["streamed"]
    assert status == 200 and 0 < len(text) <= most
    assert [e["code"] for e in errors] == ["upstream_response_too_large"]
    assert "max_tokens (8)" in errors[0]["message"]
    assert grown < BOUND_MIB


def test_oversized_answers_end_at_the_byte_bound(hostile):
    front, upstream = hostile
    results = {}
    for name, attack in (("json", lambda: chat(front, "huge-json")),
                         ("line", lambda: chat(front, "huge-line")),
                         ("line-streamed", lambda: streamed(front, "huge-line"))):
        grown = peak_growth_mib(front.pid, lambda: results.setdefault(name, attack()))
        assert grown < BOUND_MIB, (name, grown)
    for name in ("json", "line"):
        response = results[name]
        assert response.status_code == 502, (name, response.text)
        assert response.json()["error"]["code"] == "upstream_response_too_large"
        assert "THAI_UPSTREAM_MAX_RESPONSE_BYTES" in response.json()["error"]["message"]
    status, text, errors = results["line-streamed"]
    assert status == 200 and text == ""
    assert [e["code"] for e in errors] == ["upstream_response_too_large"]
    assert upstream.sent["huge-json"] < HUGE // 2 and upstream.sent["huge-line"] < HUGE


def test_what_is_held_of_an_oversized_answer_is_the_byte_bound(model_env):
    """In process, Python's own count (tracemalloc, not RSS): reading an endless line or a
    huge JSON answer holds the bound and little more, whatever the body's size."""
    import asyncio
    import tracemalloc

    from api.engine.types import GenerationRequest, SamplingParams
    from api.engine.upstream_engine import UpstreamEngine
    from api.engine.upstream_http import UpstreamTooLargeError
    from api.settings import ModelSettings

    upstream = HostileUpstream().start()

    async def peak(engine: UpstreamEngine, behaviour: str) -> int:
        tracemalloc.start()
        try:
            stream = engine.generate(GenerationRequest(
                prompt_ids=[1], params=SamplingParams(max_tokens=8),
                messages=[{"role": "user", "content": behaviour}]))
            with pytest.raises(UpstreamTooLargeError):
                async for _ in stream:
                    pass
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    async def main() -> list[int]:
        engine = UpstreamEngine(ModelSettings(
            engine="openai", upstream_urls=[upstream.url], tokenizer=model_env["THAI_LORA_PATH"],
            base_model=model_env["THAI_BASE_MODEL"], upstream_max_response_bytes=MAX_RESPONSE_BYTES))
        await engine.start()
        await engine.wait_ready(60)
        try:
            return [await peak(engine, b) for b in ("huge-line", "huge-json", "huge-line")]
        finally:
            await engine.stop()

    try:
        peaks = asyncio.run(main())
    finally:
        upstream.stop()
    # the bound, plus pieces in flight and this process's own hostile server
    assert all(p < MAX_RESPONSE_BYTES + MiB for p in peaks), [p / MiB for p in peaks]


def test_keep_alive_comments_do_not_outlive_the_request_deadline(hostile):
    front, upstream = hostile
    plain = chat(front, "comments")
    assert plain.status_code == 504, plain.text
    assert plain.json()["error"]["code"] == "request_timeout"
    assert "THAI_REQUEST_TIMEOUT_S" in plain.json()["error"]["message"]
    status, text, errors = streamed(front, "comments")
    assert status == 200 and text == ""
    assert [e["code"] for e in errors] == ["request_timeout"]
    assert upstream.sent["comments"] > 0, "the upstream did send its keep-alives"


def test_upstream_error_text_reaches_the_client_cleaned_and_cut(hostile):
    front, _ = hostile
    refused = chat(front, "dirty-error")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3600", "clamped, not 99999999"
    error = refused.json()["error"]
    for field in ("message", "type", "code", "param"):
        value = error[field] or ""
        assert not any(ch in value for ch in "\n\r\x1b\x07\u202e"), (field, value)
    assert error["message"].startswith("bad CRITICAL forged log line ข้อผิดพลาด")
    assert len(error["message"]) <= MAX_UPSTREAM_MESSAGE_CHARS
    assert error["type"] == "rate_limit_error" and error["code"] is None and error["param"] is None

    status, text, errors = streamed(front, "dirty-event")
    assert status == 200 and text == "ก"
    message = errors[0]["message"]
    assert message.startswith("bad CRITICAL") and len(message) <= MAX_UPSTREAM_MESSAGE_CHARS
    assert not any(ch in message for ch in "\n\r\x1b\x07\u202e")

