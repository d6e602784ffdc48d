"""``/v1/responses`` over the fake engine (it answers the last user message reversed): the
store's bounds and its off switch, the event sequence and its failure event, how input
items become chat turns. The real model and real clients: tests/test_responses_api.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.errors import InvalidRequestError
from api.server import create_app
from api.serving.response_store import ResponseStore
from api.serving.responses_input import input_messages
from api.settings import Settings
from tests.fakes import FakeEngine


def make_client(engine: FakeEngine | None = None, **overrides) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine()
    settings = Settings.from_overrides({"enable_ui": False, **overrides})
    return TestClient(create_app(settings, engine), raise_server_exceptions=False), engine


def sse(response) -> list[dict]:
    """The events, checking each ``event:`` line names its ``data``'s type."""
    events = []
    for block in response.text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_answer_items_usage_and_continuation():
    client, engine = make_client()
    with client:
        first = client.post("/v1/responses", json={"input": "abc", "instructions": "sys"}).json()
        assert first["status"] == "completed" and first["store"] is True
        assert [item["type"] for item in first["output"]] == ["message"]
        assert first["output"][0]["content"][0] == {"type": "output_text", "text": "cba",
                                                    "annotations": [], "logprobs": []}
        assert first["usage"]["output_tokens"] == 3
        assert first["usage"]["input_tokens"] == len("<system>sys<user>abc")
        second = client.post("/v1/responses", json={"input": "xyz",
                                                     "previous_response_id": first["id"]}).json()
        assert second["output"][0]["content"][0]["text"] == "zyx"
        prompt = "".join(chr(i) for i in engine.requests[-1].prompt_ids)
        # history and answer carried over; the first request's instructions are not
        assert prompt == "<user>abc<assistant>cba<user>xyz"
        assert client.get(f"/v1/responses/{second['id']}").json() == second
        assert client.delete(f"/v1/responses/{second['id']}").json() == {
            "id": second["id"], "object": "response.deleted", "deleted": True}
        assert client.get(f"/v1/responses/{second['id']}").status_code == 404


def test_stream_sequence_and_incomplete_status():
    client, _ = make_client()
    with client:
        response = client.post("/v1/responses", json={"input": "abcdef", "stream": True,
                                                      "max_output_tokens": 4})
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == "fedc" == final["output"][0]["content"][0]["text"]


def test_failure_mid_stream_is_an_error_event():
    client, engine = make_client(FakeEngine(fail=RuntimeError("boom")))
    with client:
        events = sse(client.post("/v1/responses", json={"input": "abcdef", "stream": True}))
    assert events[-1]["type"] == "error" and events[-1]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert engine.running == 0  # the generation was closed


def test_store_off_refuses_store_and_previous_response_id():
    client, _ = make_client(responses_store_size=0)
    with client:
        plain = client.post("/v1/responses", json={"input": "abc"}).json()
        assert plain["store"] is False
        for body, param in (({"store": True}, "store"),
                            ({"previous_response_id": plain["id"]}, "previous_response_id")):
            refused = client.post("/v1/responses", json={"input": "abc", **body})
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["param"] == param and error["code"] == "store_disabled"
            assert "THAI_RESPONSES_STORE_SIZE" in error["message"]
        missing = client.get(f"/v1/responses/{plain['id']}")
        assert missing.status_code == 404
        assert "THAI_RESPONSES_STORE_SIZE=0" in missing.json()["error"]["message"]


def test_store_bounds_and_owners():
    store = ResponseStore(max_entries=2, max_chars=10_000)
    for name in ("a", "b", "c"):
        assert store.put(name, "key:1", {"id": name}, [])
    assert store.get("a", "key:1") is None and len(store) == 2  # oldest dropped
    assert store.get("b", "key:2") is None and not store.delete("b", "key:2")  # not the owner's
    assert store.get("b", "key:1").response == {"id": "b"}
    assert not store.put("big", "key:1", {"text": "x" * 20_000}, [])  # alone over the bound
    store.put("d", "key:1", {"text": "y" * 9_980}, [])  # evicts until it fits
    assert len(store) == 1 and store.get("d", "key:1") is not None


def test_store_evicts_the_largest_owner_first():
    """A client storing many responses evicts its own, not another client's."""
    store = ResponseStore(max_entries=4, max_chars=100_000)
    store.put("b1", "key:b", {"id": "b1"}, [])
    for i in range(10):
        store.put(f"a{i}", "key:a", {"id": i}, [])
    assert store.get("b1", "key:b") is not None and len(store) == 4
    assert [name for name in ("a6", "a7", "a8", "a9") if store.get(name, "key:a")] == [
        "a7", "a8", "a9"]  # a's oldest went first, b's one response stayed
    sized = ResponseStore(max_entries=100, max_chars=1_000)
    sized.put("small", "key:b", {"t": "s" * 100}, [])
    for i in range(5):
        sized.put(f"big{i}", "key:a", {"t": "x" * 400}, [])
    assert sized.get("small", "key:b") is not None
    assert sized.get("big4", "key:a") is not None and sized.get("big0", "key:a") is None


def test_input_items_become_chat_turns():
    messages = input_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "let me look", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "r2"}]},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ])
    assert messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"a\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]
    with pytest.raises(InvalidRequestError) as info:
        input_messages([{"type": "function_call_output", "call_id": "c",
                         "output": [{"type": "input_image", "image_url": "x"}]}])
    assert info.value.param == "input[0].output[0].type"


def test_forced_tool_call_and_text_format_together():
    """Agent frameworks send their output type's format on tool turns too: a forced call
    writes no text, so the format is not a conflict there."""
    client, engine = make_client()
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    with client:
        response = client.post("/v1/responses", json={
            "input": "abc", "tools": [tool], "tool_choice": "required",
            "text": {"format": {"type": "json_object"}}})
    assert response.status_code == 200, response.text
    assert engine.requests[-1].params.grammar.kind == "lark"  # the tool-call grammar


def test_listed_and_documented():
    client, _ = make_client()
    with client:
        assert "POST /v1/responses" in client.get("/").json()["endpoints"]
        schema = client.get("/openapi.json").json()
    assert {"post"} <= set(schema["paths"]["/v1/responses"])
    assert {"get", "delete"} <= set(schema["paths"]["/v1/responses/{response_id}"])
    props = schema["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "tools", "text", "previous_response_id", "store"} <= set(props)
