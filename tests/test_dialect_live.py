"""The vLLM/OpenAI dialect through the real server (demo checkpoint, the ``openai`` SDK with
``extra_body`` for vLLM's fields): partial characters, template options, prefill, prompt
lists, prompt log probabilities, token ids, truncation, usage on every chunk."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from api.engine.base import token_bytes

MODEL = "thai-qwen-lora"


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    return AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))


def sse(response) -> list[dict]:
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text[-500:]
    return [json.loads(line) for line in lines[:-1]]


# ------------------------------------------------------------ partial characters
@pytest.fixture(scope="module")
def partial_token(tokenizer) -> int:
    """A token of the demo vocabulary that is "ภา" plus the first two bytes of a Thai letter."""
    ids = list(range(len(tokenizer)))
    for token_id, raw in zip(ids, token_bytes(tokenizer, ids)):
        if raw.startswith("ภา".encode()) and len(raw) == 8:
            try:
                raw.decode()
            except UnicodeDecodeError:
                return token_id
    pytest.fail("the demo vocabulary has no token ending mid-character after ภา")


def test_tokens_ending_mid_character_keep_their_text(client, http, tokenizer, partial_token):
    """Forced by logit_bias, each of 24 tokens ends mid-character: the reply is what the
    tokenizer's decode (and /detokenize) gives, streamed and not; nothing is lost."""
    expected = tokenizer.decode([partial_token] * 24)
    assert expected == "ภา\ufffd" * 24
    detok = http.post("/detokenize", json={"tokens": [partial_token] * 24}).json()["prompt"]
    assert detok == expected
    body = dict(model=MODEL, messages=[{"role": "user", "content": "สวัสดี"}], max_tokens=24,
                temperature=0, logit_bias={str(partial_token): 100})
    reply = client.chat.completions.create(**body)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 24
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(**body, stream=True) if c.choices]
    assert "".join(pieces) == expected
    texts = [p for p in pieces if p]
    assert all(p.endswith("ภา") for p in texts[:-1]), "only the incomplete tail is held back"
    text = client.completions.create(model=MODEL, prompt="ภาษา", max_tokens=24, temperature=0,
                                     logit_bias={str(partial_token): 100})
    assert text.choices[0].text == expected
