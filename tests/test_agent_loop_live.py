"""Long agent loops (a call and its result per round) are bounded by the context window and
by bytes, not by a message count they reach: a 64-round loop through the real server, on a
demo checkpoint whose window holds it (the shared one's 4096 tokens do not)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support import start_server

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                      "properties": {}}}}]


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory):
    from api.engine.demo_checkpoint import build_demo_checkpoint

    base, lora = build_demo_checkpoint(tmp_path_factory.mktemp("wide"), max_position_embeddings=16384)
    server = start_server({"THAI_BASE_MODEL": str(base), "THAI_LORA_PATH": str(lora),
                           "THAI_REQUIRE_MODEL": "true", "THAI_DTYPE": "float32",
                           "THAI_QUANTIZATION": "none", "THAI_ENABLE_UI": "false"},
                          tmp_path_factory.mktemp("wide-logs"))
    yield server
    server.stop()


def agent_loop(rounds: int) -> list[dict]:
    messages = [{"role": "user", "content": "ค้น"}]
    for i in range(rounds):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": "1"})
    return messages


def test_a_64_round_agent_loop_is_served(wide_server):
    client = openai.OpenAI(base_url=wide_server.url + "/v1", api_key="x", max_retries=0)
    messages = agent_loop(64)
    assert len(messages) == 129  # above the old bound of 128 messages
    with httpx.Client(base_url=wide_server.url, timeout=120) as http:
        count = http.post("/tokenize", json={"messages": messages, "tools": TOOLS}).json()["count"]
        reply = client.chat.completions.create(model="thai-qwen-lora", messages=messages,
                                               tools=TOOLS, max_tokens=4)
        assert reply.usage.prompt_tokens == count > 4096
        # still bounded: by the window (tokens) ...
        r = http.post("/v1/chat/completions", json={"messages": agent_loop(400), "tools": TOOLS,
                                                    "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # ... and by bytes (THAI_MAX_CHAT_BYTES), before any template is rendered
        big = [{"role": "user", "content": "ก" * 300_000}, {"role": "assistant", "content": "ข" * 300_000}]
        body = json.dumps({"messages": big, "max_tokens": 4}, ensure_ascii=False).encode()
        assert len(body) < 2 * 1024 * 1024  # under the body limit: the bytes bound answers
        r = http.post("/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "messages_too_large"
