"""A real server process on loopback, the generated checkpoint with its LoRA adapter,
driven by the official ``openai`` client and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="not-required-for-local")


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    return AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))


def prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False))


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["thai-qwen-lora"]


def test_chat_completion_usage_matches_tokenizer(client, tokenizer):
    messages = [{"role": "user", "content": "สรุปประโยชน์ของการออกกำลังกาย"}]
    response = client.chat.completions.create(model="thai-qwen-lora", messages=messages,
                                              max_tokens=12, temperature=0.7)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert response.usage.prompt_tokens == prompt_tokens(tokenizer, messages)
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_fixed_length_with_vllm_extensions(client):
    response = client.chat.completions.create(
        model="thai-qwen-lora", messages=[{"role": "user", "content": "คำถาม"}], max_tokens=20,
        extra_body={"min_tokens": 20, "ignore_eos": True})
    assert response.usage.completion_tokens == 20
    assert response.choices[0].finish_reason == "length"


def test_streamed_chat_with_usage(client, tokenizer):
    messages = [{"role": "system", "content": "ตอบสั้น ๆ"}, {"role": "user", "content": "สวัสดีครับ"}]
    stream = client.chat.completions.create(model="thai-qwen-lora", messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 16, "ignore_eos": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2, "tokens should arrive in several chunks"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == 16
    assert usage.prompt_tokens == prompt_tokens(tokenizer, messages)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_invalid_bodies(client, live_server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="thai-qwen-lora", messages=[{"role": "user", "content": "x"}], n=17)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="thai-qwen-lora", messages=[], max_tokens=5)
    r = httpx.post(live_server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_seed_curl_summarize(live_server, tokenizer):
    """The original design's curl example, unchanged."""
    r = httpx.post(live_server.url + "/v1/summarize", timeout=60,
                   json={"text": "ข้อความที่ต้องการสรุปเป็นภาษาไทย...", "max_tokens": 100, "temperature": 0.7})
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"summary", "model", "usage"}
    assert body["model"] == "thai-qwen-lora"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 1 <= usage["output_tokens"] <= 100


def test_health_docs_redoc_metrics(live_server, client):
    health = httpx.get(live_server.url + "/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["dtype_reason"] == "float32: set by THAI_DTYPE"  # model_env pins it
    assert health["quantization"] == "none"
    assert health["quantization_reason"] == "none: set by THAI_QUANTIZATION"
    assert health["memory_mb"] > 0 and health["uptime_s"] > 0 and health["demo"] is False
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(live_server.url + path).status_code == 200
    client.chat.completions.create(model="thai-qwen-lora", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    metrics = httpx.get(live_server.url + "/metrics").text
    for name in ("thai:time_to_first_token_seconds_count", "thai:generation_tokens_total",
                 "thai:num_requests_running", "thai:num_requests_waiting", "http_requests_total"):
        assert name in metrics
