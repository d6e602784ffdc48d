"""The upstream engine's choices without servers: balancing, the request it sends, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from api.engine.errors import UpstreamStatusError
from api.engine.metrics import EngineMetrics
from api.engine.types import GenerationRequest, SamplingParams
from api.engine.upstream_engine import UpstreamEngine, UpstreamMetrics, UpstreamPool
from api.engine.upstream_http import status_error as _status_error
from api.errors import error_content
from api.settings import ModelSettings


def pool(n: int) -> UpstreamPool:
    result = UpstreamPool([f"http://u{i}:8000" for i in range(n)], UpstreamMetrics(EngineMetrics("m")))
    for upstream in result.upstreams:
        result.mark(upstream, True)
    return result


def test_least_outstanding_then_round_robin():
    p = pool(3)
    a, b, c = p.upstreams
    picks = [p.pick() for _ in range(6)]
    assert {u.index for u in picks} == {0, 1, 2}, "ties rotate"
    p.acquire(a), p.acquire(a), p.acquire(b)
    assert p.pick() is c
    p.acquire(c)
    assert p.pick() in (b, c)
    p.mark(b, False, "down"), p.mark(c, False, "down")
    assert p.pick() is a, "only healthy upstreams are chosen, however busy"
    assert p.pick(exclude=a) is None


def test_the_body_carries_the_chat_our_sampling_and_the_clients_extras():
    engine = UpstreamEngine(ModelSettings(engine="openai", upstream_urls=["http://u:1"],
                                          upstream_model="thai-qwen-lora"))
    request = GenerationRequest(
        prompt_ids=[1, 2], params=SamplingParams(max_tokens=9, temperature=0.0, top_p=1.0, seed=7,
                                                  stop=("จบ",), min_tokens=2, no_repeat_ngram_size=0),
        messages=[{"role": "user", "content": "สวัสดี"}], passthrough={"repetition_penalty": 1.1})
    body = engine.body(request)
    assert body == {"repetition_penalty": 1.1, "model": "thai-qwen-lora",
                    "messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 9,
                    "temperature": 0.0, "top_p": 1.0, "stream": True,
                    "stream_options": {"include_usage": True}, "seed": 7, "stop": ["จบ"],
                    "min_tokens": 2}
    # The summarizer's seed default (3) is our sampler's: sent, for replicas of this app.
    summary = engine.body(GenerationRequest(prompt_ids=[1], params=SamplingParams(),
                                            messages=[{"role": "user", "content": "ข่าว"}]))
    assert summary["no_repeat_ngram_size"] == 3
    with pytest.raises(ValueError):
        engine.body(GenerationRequest(prompt_ids=[1], params=SamplingParams()))


@pytest.mark.parametrize("status, payload, expect_status, expect_code", [
    (429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limited"}}, 429, "rate_limited"),
    (503, {"error": {"message": "loading"}}, 503, None),
    (422, {"detail": "Unexpected fields in the request: {'x'}"}, 400, None),
    (401, {"error": {"message": "bad key"}}, 502, "upstream_auth_failed"),
    (500, {}, 502, None),
    (404, {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}, 502,
     "upstream_model_not_found"),
])
def test_upstream_statuses_map_to_what_the_client_should_get(status, payload, expect_status, expect_code):
    response = httpx.Response(status, content=json.dumps(payload).encode(),
                              headers={"Retry-After": "7"} if status in (429, 503) else {})
    error = asyncio.run(_status_error(response))
    assert isinstance(error, UpstreamStatusError)
    got_status, body, headers = error_content(error)
    assert got_status == expect_status and body["error"]["code"] == expect_code
    if status in (429, 503):
        assert headers["Retry-After"] == "7"
    if status == 401:
        assert "bad key" not in body["error"]["message"]


def test_settings_need_upstreams_for_the_openai_engine():
    from api.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="THAI_UPSTREAM_URLS"):
        Settings.from_overrides({"engine": "openai"})
    settings = Settings.from_overrides({"engine": "openai", "upstream_urls": "http://a:8000/v1/,https://b"})
    assert settings.model.upstream_urls == ["http://a:8000", "https://b"]
    with pytest.raises(SettingsError, match="not an http"):
        Settings.from_overrides({"upstream_urls": "file:///etc/passwd"})
    with pytest.raises(SettingsError) as hidden:
        Settings.from_overrides({"upstream_api_key": 5})
    assert "<hidden>" in str(hidden.value)


def test_a_plain_prompt_goes_to_the_upstreams_completions_as_token_ids():
    from api.engine.upstream_engine import UpstreamStream

    engine = UpstreamEngine(ModelSettings(engine="openai", upstream_urls=["http://u:1"],
                                          upstream_model="thai-qwen-lora"))
    request = GenerationRequest(prompt_ids=[5, 6, 7], params=SamplingParams(max_tokens=4, temperature=0.0,
                                                                             top_p=1.0, no_repeat_ngram_size=0),
                                passthrough={"logit_bias": {"5": 1}}, plain_prompt=True)
    assert engine.body(request) == {"logit_bias": {"5": 1}, "model": "thai-qwen-lora",
                                    "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0,
                                    "top_p": 1.0, "stream": True,
                                    "stream_options": {"include_usage": True}}
    stream = UpstreamStream(engine, request)
    assert stream.path == "/v1/completions"

    events = [{"choices": [{"index": 0, "text": "ก"}]}, {"choices": [{"index": 0, "text": "ข"}]},
              {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]

    async def relayed():
        for event in events:
            yield event
        yield None  # [DONE]

    async def read():
        stream._events = relayed()
        return [await stream._next_chunk() for _ in range(3)]

    first, second, last = asyncio.run(read())
    assert (first.text, second.text) == ("ก", "ข")
    assert last.finished and last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (3, 2)
    chat = GenerationRequest(prompt_ids=[1], params=SamplingParams(), messages=[{"role": "user", "content": "x"}])
    assert UpstreamStream(engine, chat).path == "/v1/chat/completions"


# ------------------------------------------------- what an upstream engine may be sent
VLLM_ONLY_FIELDS = [("best_of", 64), ("chat_template", "{{ raise_exception('x') }}"),
                    ("logits_processors", ["evil.module:Processor"]),
                    ("lora_request", {"lora_name": "x", "lora_path": "/etc"}),
                    ("guided_decoding_backend", "xgrammar"), ("return_tokens_as_token_ids", True)]


@pytest.fixture
def upstream_front():
    """The app over a fake engine that calls itself an upstream one (THAI_ENGINE=openai)."""
    from fastapi.testclient import TestClient

    from api.server import create_app
    from api.settings import Settings
    from tests.fakes import FakeEngine

    engine = FakeEngine()
    engine.info.engine = "openai"
    app = create_app(Settings.from_overrides({"enable_ui": False}), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_declared_vllm_fields_upstream(upstream_front, route):
    """The template options and truncation are forwarded (the upstream applies its own
    template); prompt log probabilities and token ids, which its text-only relay cannot
    carry back, are a 400 naming them."""
    client, engine = upstream_front
    chat = route.endswith("chat/completions")
    prompt = ({"messages": [{"role": "user", "content": "สวัสดี"}]} if chat else {"prompt": "สวัสดี"})
    body = {"model": "thai-qwen-lora", "max_tokens": 4, **prompt, "truncate_prompt_tokens": 3}
    if chat:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    passed = engine.requests[-1].passthrough
    assert passed["truncate_prompt_tokens"] == 3 and len(engine.requests[-1].prompt_ids) == 3
    if chat:
        assert passed["chat_template_kwargs"] == {"enable_thinking": False}
    for name, value in (("prompt_logprobs", 1), ("return_token_ids", True)):
        response = client.post(route, json={**body, name: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == name
        assert "THAI_ENGINE=openai" in response.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("name, value", VLLM_ONLY_FIELDS)
def test_fields_the_schema_does_not_declare_are_refused_before_the_upstream(upstream_front, route,
                                                                            name, value):
    client, engine = upstream_front
    prompt = ({"messages": [{"role": "user", "content": "สวัสดี"}]} if route.endswith("chat/completions")
              else {"prompt": "สวัสดี"})
    body = {"model": "thai-qwen-lora", "max_tokens": 4, **prompt, name: value}
    if route == "/v1/completions" and name == "best_of":
        body["best_of"] = 1  # declared there (null or n): accepted, and still not forwarded
        response = client.post(route, json=body)
        assert response.status_code == 200, response.text
        assert engine.requests[-1].passthrough == {}
        return
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_field" and error["param"] == name
    assert error["message"].startswith(f"unsupported field(s) for {route}: {name}")
    assert engine.requests == [], "a refused request never reaches the engine"


def test_priority_is_bounded_and_never_sent_upstream(upstream_front):
    """vLLM's priority orders every caller's requests there, so the front refuses it rather
    than forward it (the local engine orders a tenant's own requests by it)."""
    client, engine = upstream_front
    for value in (1, -1000000):
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "priority": value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "priority"
    assert engine.requests == []
    assert client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "priority": 0}).status_code == 200
    assert "priority" not in engine.requests[-1].passthrough


def test_the_local_and_upstream_engines_refuse_the_same_fields_with_the_same_error(upstream_front):
    from fastapi.testclient import TestClient

    from api.server import create_app
    from api.settings import Settings
    from tests.fakes import FakeEngine

    upstream_client, _ = upstream_front
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "best_of": 4}
    with TestClient(create_app(Settings.from_overrides({"enable_ui": False}), FakeEngine()),
                    raise_server_exceptions=False) as local_client:
        local = local_client.post("/v1/chat/completions", json=body)
    upstream = upstream_client.post("/v1/chat/completions", json=body)
    assert local.status_code == upstream.status_code == 400
    assert local.json() == upstream.json()


def test_declared_vllm_fields_are_bounded_and_forwarded_as_validated(upstream_front):
    client, engine = upstream_front
    fields = {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "stop_token_ids": [3, 4],
              "include_stop_str_in_output": True, "frequency_penalty": 0.5,
              "presence_penalty": -0.5, "logit_bias": {"7": -100}, "no_repeat_ngram_size": 3}
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 4, "user": "u-1", **fields})
    assert response.status_code == 200, response.text
    assert engine.requests[-1].passthrough == fields, "declared fields only; user is not forwarded"
    for name, value in (("top_k", 1 << 21), ("min_p", 2.0), ("repetition_penalty", 11.0),
                        ("stop_token_ids", list(range(65))), ("frequency_penalty", 3.0),
                        ("logit_bias", {"7": 101}), ("no_repeat_ngram_size", 33),
                        ("max_tokens", 10**6), ("min_tokens", 5)):
        refused = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, name: value})
        assert refused.status_code == 400, (name, refused.text)
    assert len(engine.requests) == 1


def test_every_forwarded_field_is_declared_by_both_request_schemas():
    from api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

    for schema in (ChatCompletionRequest, CompletionRequest):
        assert set(SamplingFields.PASSED_ON) <= set(schema.model_fields), schema


# ------------------------------------------------- reading a hostile upstream's answers
def test_an_upstreams_error_text_is_one_clean_capped_line():
    from api.engine.upstream_http import MAX_UPSTREAM_MESSAGE_CHARS, clean_message

    dirty = "line one\n\x1b[1;31mCRITICAL\x1b[0m forged\r\n\x07\x1b]0;title\x07\u202eevil\u2028 " + "ก" * 900
    clean = clean_message(dirty)
    assert clean.startswith("line one CRITICAL forged evil กก")
    assert len(clean) == MAX_UPSTREAM_MESSAGE_CHARS and clean.endswith("…")
    assert all(ch.isprintable() for ch in clean)
    assert clean_message("ปกติ ไม่มีอะไร") == "ปกติ ไม่มีอะไร"


def test_status_errors_keep_only_clean_fields_and_read_a_bounded_prefix():
    body = json.dumps({"error": {"message": "oops\n\x1b[2J" + "x" * 2000, "type": "bad\ntype",
                                 "code": 10**12, "param": "messages.0.content"}}).encode()
    error = asyncio.run(_status_error(httpx.Response(400, content=body, headers={"Retry-After": "5"})))
    assert error.status == 400 and str(error).startswith("oops x") and len(str(error)) <= 500
    assert error.error_type is None and error.code is None and error.param == "messages.0.content"
    assert error.retry_after == "5"
    limited = asyncio.run(_status_error(httpx.Response(429, content=b"{}",
                                                       headers={"Retry-After": "99999999"})))
    assert limited.retry_after == "3600"
    superscript_two = "\u00b2".encode("latin-1")  # str.isdigit() says yes
    junk = asyncio.run(_status_error(httpx.Response(503, content=b"{}",
                                                    headers={"Retry-After": superscript_two})))
    assert junk.retry_after is None
    # a body longer than the bound is not parsed (and not read past it)
    big = asyncio.run(_status_error(httpx.Response(400, content=body), limit=100))
    assert str(big) == "The model server answered HTTP 400."


def _events(content: bytes, kind: str = "text/event-stream", limit: int = 1 << 20,
            plain: bool = False, **headers: str) -> list:
    from api.engine.upstream_http import events

    async def read():
        async def body():
            for start in range(0, len(content), 7):  # in odd pieces: lines span them
                yield content[start:start + 7]

        response = httpx.Response(200, content=body(), headers={"content-type": kind, **headers})
        return [event async for event in events(response, limit, plain)]

    return asyncio.run(read())


def test_events_from_a_stream_a_json_answer_and_past_the_byte_bound():
    from api.engine.errors import UpstreamError
    from api.engine.upstream_http import UpstreamTooLargeError

    stream = (b": keep-alive\r\n\r\nevent: x\ndata: {\"choices\": [{\"delta\": {\"content\": \"\xe0\xb8\x81\"}}]}\r\n\r\n"
              b"data: [1]\n\ndata: [DONE]\n\n")
    assert _events(stream) == [{"choices": [{"delta": {"content": "ก"}}]}, None]
    with pytest.raises(UpstreamTooLargeError):
        _events(b": keep-alive\n\n" * 1000, limit=4096)
    with pytest.raises(UpstreamTooLargeError):
        _events(b"data: " + b"x" * 10000, limit=4096)  # one endless line
    with pytest.raises(UpstreamError, match="malformed"):
        _events(b"data: {not json\n\n")
    with pytest.raises(UpstreamError, match="compressed"):
        _events(stream, **{"content-encoding": "gzip"})
    answer = json.dumps({"choices": [{"index": 0, "message": {"content": "สรุป"}, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
    assert _events(answer, "application/json") == [
        {"usage": {"prompt_tokens": 3, "completion_tokens": 1},
         "choices": [{"index": 0, "finish_reason": "length", "delta": {"content": "สรุป"}}]}, None]
    with pytest.raises(UpstreamTooLargeError):
        _events(answer, "application/json", limit=len(answer) - 1)


def test_usage_and_finish_reasons_the_upstream_cannot_have_meant_are_not_relayed():
    from api.engine.upstream_engine import UpstreamStream

    engine = UpstreamEngine(ModelSettings(engine="openai", upstream_urls=["http://u:1"]))
    engine.count_tokens = lambda text: len(text)  # no tokenizer loaded here
    stream = UpstreamStream(engine, GenerationRequest(
        prompt_ids=[1, 2], params=SamplingParams(max_tokens=4), messages=[{"role": "user", "content": "x"}]))

    async def relayed():
        yield {"choices": [{"index": 0, "delta": {"content": "กข"}, "finish_reason": "x" * 100}]}
        yield {"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 10**15}}
        yield None

    async def read():
        stream._events = relayed()
        return [await stream._next_chunk() for _ in range(2)]

    text, last = asyncio.run(read())
    assert text.text == "กข" and last.finish_reason == "stop"
    assert (last.prompt_tokens, last.completion_tokens) == (2, 2)


def test_a_socket_gone_while_connecting_is_a_connection_error_for_failover(monkeypatch):
    """The race seen with a replica killed mid-load: httpcore's connect raised anyio's
    AttributeError (its socket was already gone), which became a 500. The upstream
    transport reads it as a ConnectError, which the stream fails over on; any other
    AttributeError is still a bug and passes through."""
    from httpcore import AsyncConnectionPool

    from api.engine.upstream_http import UpstreamTransport

    raised = AttributeError("'NoneType' object has no attribute 'getpeername'")

    async def gone(self, request):
        raise raised

    monkeypatch.setattr(AsyncConnectionPool, "handle_async_request", gone)

    async def send() -> None:
        async with httpx.AsyncClient(transport=UpstreamTransport()) as client:
            await client.get("http://127.0.0.1:9/health")

    with pytest.raises(httpx.ConnectError, match="closed while it was opened") as caught:
        asyncio.run(send())
    assert caught.value.__cause__ is raised
    raised = AttributeError("'Settings' object has no attribute 'x'")
    with pytest.raises(AttributeError, match="'Settings' object"):
        asyncio.run(send())
