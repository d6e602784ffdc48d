"""One request's output is bounded: n x max_tokens (THAI_MAX_OUTPUT_TOKENS_PER_REQUEST) and
its log probabilities (THAI_MAX_LOGPROB_ENTRIES), a 400 naming the setting beyond them; a
request without max_tokens gets its share of the bounds. The ``priority`` field and the
tenant reach the engine. Over a fake engine, then against a real server."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from api.engine.tenants import anon_tenant
from api.server import create_app
from api.settings import Settings
from tests.fakes import FakeEngine


def make_client(**overrides) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(max_context=4096)
    settings = Settings.from_overrides({"enable_ui": False, **overrides})
    return TestClient(create_app(settings, engine), raise_server_exceptions=False), engine


def chat(client: TestClient, **body) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": "สวัสดี"}], **body}
    return client.post("/v1/chat/completions", json=payload)


def refused(r: httpx.Response, setting: str, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error", "output_too_large", param)
    assert setting in error["message"]


def test_the_reported_amplification_is_refused():
    """n=16, max_tokens=2048, top_logprobs=20: a 64.5 MB answer before; now a 400."""
    client, engine = make_client()
    with client:
        r = chat(client, n=16, max_tokens=2048, logprobs=True, top_logprobs=20)
        refused(r, "THAI_MAX_OUTPUT_TOKENS_PER_REQUEST", "n")
        assert len(r.content) < 1000 and engine.requests == []
        r = chat(client, n=4, max_tokens=2048, logprobs=True, top_logprobs=20)
        refused(r, "THAI_MAX_LOGPROB_ENTRIES", "logprobs")  # 8192 tokens, 172,032 entries
        assert chat(client, n=4, max_tokens=2048).status_code == 200  # 8192 tokens: the bound


def test_the_bounds_are_settings():
    client, engine = make_client(max_output_tokens_per_request=100, max_logprob_entries=100)
    with client:
        assert chat(client, n=4, max_tokens=25).status_code == 200
        refused(chat(client, n=4, max_tokens=26), "THAI_MAX_OUTPUT_TOKENS_PER_REQUEST", "n")
        refused(chat(client, max_tokens=101), "THAI_MAX_OUTPUT_TOKENS_PER_REQUEST", "max_tokens")
        assert chat(client, n=2, max_tokens=10, logprobs=True, top_logprobs=4).status_code == 200
        refused(chat(client, n=2, max_tokens=10, logprobs=True, top_logprobs=5),
                "THAI_MAX_LOGPROB_ENTRIES", "logprobs")
        r = client.post("/v1/completions", json={"prompt": "x" * 50, "max_tokens": 1,
                                                  "logprobs": 1, "echo": True})
        refused(r, "THAI_MAX_LOGPROB_ENTRIES", "logprobs")  # the prompt's 2 x 50 count too
        r = client.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 2, "n": 2,
                                                  "logprobs": 1, "echo": True})
        assert r.status_code == 200, r.text  # 2 x (2 x 2 + 20 x 2) = 88


def test_without_max_tokens_a_request_gets_its_share():
    client, engine = make_client(max_output_tokens_per_request=100, max_logprob_entries=60)
    with client:
        assert chat(client, n=4).status_code == 200
        assert {g.params.max_tokens for g in engine.requests} == {25}
        engine.requests.clear()
        assert chat(client, n=4, logprobs=True, top_logprobs=4).status_code == 200
        assert {g.params.max_tokens for g in engine.requests} == {3}  # 60 // (4 x 5)
        engine.requests.clear()
        assert chat(client).status_code == 200
        assert engine.requests[0].params.max_tokens == 100


def test_priority_and_tenant_reach_the_engine():
    client, engine = make_client()
    with client:
        assert chat(client, priority=-100, n=2).status_code == 200
        assert [(g.priority, g.tenant) for g in engine.requests] == [
            (-100, anon_tenant("testclient"))] * 2
        r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "priority": 7})
        assert r.status_code == 200 and engine.requests[-1].priority == 7
        for bad in (101, -101, 1.5, "1"):
            r = chat(client, priority=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
        r = client.post("/v1/summarize", json={"text": "ข่าววันนี้ฝนตกหนัก", "max_tokens": 4})
        assert r.status_code == 200 and engine.requests[-1].tenant == anon_tenant("testclient")


def test_priority_is_refused_not_dropped_with_an_upstream_engine():
    client, engine = make_client()
    engine.info.engine = "openai"
    with client:
        r = chat(client, priority=3)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        assert "THAI_ENGINE=openai" in r.json()["error"]["message"]


def test_the_keyed_tenant_is_the_key_label_never_the_key():
    from api.security import key_label

    key = "tenant-test-key-0123456789"
    engine = FakeEngine(max_context=4096)
    settings = Settings.from_overrides({"enable_ui": False, "api_keys": [key]})
    with TestClient(create_app(settings, engine)) as client:
        r = client.post(
            "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert engine.requests[-1].tenant == f"key:{key_label(key)}"
        assert key not in engine.requests[-1].tenant


# ------------------------------------------------------------ a real server
def test_live_server_bounds_one_requests_output(live_server):
    url = live_server.url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "สวัสดี"}]
    r = httpx.post(url, json={"messages": messages, "n": 16, "max_tokens": 2048,
                              "logprobs": True, "top_logprobs": 20}, timeout=60)
    assert r.status_code == 400 and len(r.content) < 1000
    assert r.json()["error"]["code"] == "output_too_large"
    assert "THAI_MAX_OUTPUT_TOKENS_PER_REQUEST" in r.json()["error"]["message"]
    # No max_tokens: each of 16 choices gets at most 65536 // (16 x 21) = 195 tokens.
    r = httpx.post(url, json={"messages": messages, "n": 16, "logprobs": True,
                              "top_logprobs": 20, "temperature": 0}, timeout=300)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 16
    assert all(len(c["logprobs"]["content"]) <= 195 for c in choices)
    assert r.json()["usage"]["completion_tokens"] <= 16 * 195
    assert len(r.content) < 16 * 195 * 21 * 200  # about 200 bytes per entry at most
    print(f"\nn=16, top_logprobs=20, no max_tokens: {r.json()['usage']['completion_tokens']} "
          f"tokens, {len(r.content) / 1e6:.2f} MB")
