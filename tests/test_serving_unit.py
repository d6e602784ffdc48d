"""The serving layer and routers over a fake engine (fast, no model)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.engine.errors import EngineOutOfMemoryError
from api.server import create_app
from api.settings import Settings
from tests.fakes import FakeEngine


def make_client(**engine_kwargs) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(**engine_kwargs)
    settings = Settings.from_overrides({"enable_ui": False})
    # Like a real server: a 500 is answered, not re-raised into the test.
    return TestClient(create_app(settings, engine), raise_server_exceptions=False), engine


@pytest.fixture
def client():
    c, engine = make_client()
    with c:
        yield c


def chat(client, **body):
    payload = {"model": "thai-qwen-lora", "messages": [{"role": "user", "content": "สวัสดี"}], **body}
    return client.post("/v1/chat/completions", json=payload)


def sse_events(response) -> list:
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_completion_shape(client):
    r = chat(client)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "thai-qwen-lora"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "สวัสดี"[::-1],
                                             "tool_calls": []}  # vLLM's shape
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_stream_chunks_usage_and_done(client):
    r = chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=3)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "".join(content) == "สวัสดี"[::-1][:3]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
    assert len({e["id"] for e in events}) == 1


def test_list_content_parts_and_developer_role(client):
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]}]})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "cba"


def test_unknown_model_is_404(client):
    r = chat(client, model="gpt-4")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, param", [
    ({"n": 17}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"stop": ["a"] * 9}, "stop"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
])
def test_bad_requests_are_400_in_openai_envelope(client, body, param):
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_is_400(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]


def test_sampling_fields_reach_the_engine_and_unknown_ones_are_refused():
    client, engine = make_client()
    with client:
        _check_sampling_fields(client, engine)


def _check_sampling_fields(client, engine):
    r = chat(client, logit_bias={"1": 2}, frequency_penalty=0.5, top_k=4, min_p=0.1,
             repetition_penalty=1.2, stop_token_ids=[5], include_stop_str_in_output=True)
    assert r.status_code == 200, r.text
    p = engine.requests[-1].params
    assert (p.logit_bias, p.frequency_penalty, p.top_k, p.min_p, p.repetition_penalty,
            p.stop_token_ids, p.include_stop_str_in_output) == (((1, 2.0),), 0.5, 4, 0.1, 1.2,
                                                                (5,), True)
    assert p.no_repeat_ngram_size == 0, "the OpenAI routes do not block n-grams by default"
    r = chat(client, best_of=2, reasoning_effort="low")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "unsupported_field" and error["param"] == "best_of"
    assert "best_of" in error["message"] and "reasoning_effort" in error["message"]


def test_blank_user_message_is_400(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": " \u200b\n"}]})
    assert r.status_code == 400


def test_summarize(client):
    r = client.post("/v1/summarize", json={"text": "ข้อความ", "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "thai-qwen-lora" and len(body["summary"]) == 4
    assert body["usage"]["output_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + 4


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200b", "\n\t"])
def test_summarize_empty_text_is_400(client, text):
    r = client.post("/v1/summarize", json={"text": text})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "text"


def test_context_length_exceeded():
    c, _ = make_client(max_context=20)
    with c:
        r = chat(c, max_tokens=10)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_loading_gives_503():
    c, _ = make_client(ready=False)
    with c:
        health = c.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "loading" and health.json()["model_loaded"] is False
        r = chat(c)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_ready"
        assert "Retry-After" in r.headers


def test_error_mid_stream_is_an_error_event():
    c, _ = make_client(fail=EngineOutOfMemoryError("out of memory"))
    with c:
        events = sse_events(chat(c, stream=True))
    assert events[-1]["error"]["code"] == "out_of_memory"


def test_unexpected_error_is_500_without_traceback():
    c, _ = make_client(fail=RuntimeError("secret internals"))
    with c:
        r = chat(c)
    assert r.status_code == 500
    assert "secret" not in r.text and "Traceback" not in r.text
    assert r.json()["error"]["type"] == "internal_server_error"


def test_root_health_models_docs(client):
    info = client.get("/").json()
    assert info["model"] == "thai-qwen-lora" and "POST /v1/summarize" in info["endpoints"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "thai-qwen-lora"
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"max_completion_tokens", "min_tokens", "ignore_eos", "stream_options"} <= set(props)


def test_cors_off_by_default_and_configurable():
    c, _ = make_client()
    with c:
        r = c.options("/v1/models", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
    app = create_app(Settings.from_overrides({"enable_ui": False, "cors_origins": "https://x.example"}), FakeEngine())
    with TestClient(app) as c2:
        r = c2.get("/v1/models", headers={"Origin": "https://x.example"})
        assert r.headers["access-control-allow-origin"] == "https://x.example"


def test_unexpected_error_mid_stream_hides_internals():
    c, _ = make_client(fail=RuntimeError("secret internals"))
    with c:
        events = sse_events(chat(c, stream=True))
    error = events[-1]["error"]
    assert error["type"] == "internal_server_error" and "secret" not in error["message"]


def test_a_forced_tool_call_and_another_output_constraint_are_refused_together(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"guided_regex": "[0-9]+"}, "guided_regex")):
        r = chat(client, tools=tools, tool_choice="required", **extra)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["code"] == "invalid_structured_output"
    r = chat(client, tools=tools, tool_choice={"type": "function", "function": {"name": "g"}})
    assert r.status_code == 400 and "not among the tools" in r.json()["error"]["message"]
    r = chat(client, guided_regex="a+", guided_choice=["x"])
    assert r.status_code == 400 and "only one output constraint" in r.json()["error"]["message"]


class _TwoCallsEngine(FakeEngine):
    """Answers every request with two tool calls, as a model using tool_choice auto may."""

    REPLY = ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
             '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>')

    async def _run(self, request):
        from api.engine import GenerationChunk

        yield GenerationChunk(self.REPLY, len(request.prompt_ids), 30, finished=True,
                              finish_reason="stop")


def test_parallel_tool_calls_false_keeps_one_call_under_auto():
    engine = _TwoCallsEngine()
    app = create_app(Settings.from_overrides({"enable_ui": False}), engine)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with TestClient(app, raise_server_exceptions=False) as client:
        both = chat(client, tools=tools).json()["choices"][0]["message"]["tool_calls"]
        one = chat(client, tools=tools, parallel_tool_calls=False).json()["choices"][0]
        streamed = client.post("/v1/chat/completions", json={
            "model": "thai-qwen-lora", "messages": [{"role": "user", "content": "x"}],
            "tools": tools, "parallel_tool_calls": False, "stream": True})
    assert [json.loads(c["function"]["arguments"]) for c in both] == [{"x": 1}, {"x": 2}]
    assert len(one["message"]["tool_calls"]) == 1 and one["finish_reason"] == "tool_calls"
    assert json.loads(one["message"]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    events = [json.loads(line[5:]) for line in streamed.text.splitlines()
              if line.startswith("data:") and line != "data: [DONE]"]
    indexes = {call["index"] for e in events for ch in e["choices"]
               for call in ch["delta"].get("tool_calls") or ()}
    assert indexes == {0}


def test_stream_options_without_stream_and_unknown_stream_options_are_refused(client):
    r = chat(client, stream_options={"include_usage": True})
    assert r.status_code == 400 and "stream: true" in r.json()["error"]["message"]
    r = chat(client, stream=True, stream_options={"per_token_usage": True})
    assert r.status_code == 400 and "per_token_usage" in r.json()["error"]["param"]
