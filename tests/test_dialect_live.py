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


# ------------------------------------------------------------ harmless fields, usage
def test_fields_without_an_instruction_for_generation_are_accepted(client):
    """metadata, store: false and service_tier auto (sent by clients by default) change
    nothing; store: true (nothing is stored here) and other tiers are refused by name."""
    messages = [{"role": "user", "content": "สวัสดี"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           temperature=0)
    same = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                          temperature=0, metadata={"run": "a"}, store=False,
                                          service_tier="auto")
    assert same.choices[0].message.content == plain.choices[0].message.content
    for field, value in (("store", True), ("service_tier", "flex")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           **{field: value})
        assert field in str(refused.value)


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    messages = [{"role": "user", "content": "เล่าเรื่อง"}]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert chunks and all(c.usage is not None for c in chunks)
    prompt = chunks[0].usage.prompt_tokens
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0
    assert all(c.usage.prompt_tokens == prompt for c in chunks)
    assert all(c.usage.total_tokens == prompt + c.usage.completion_tokens for c in chunks)
    assert chunks[-1].choices == [] and counts[-1] == chunks[-2].usage.completion_tokens
    text_chunks = list(client.completions.create(
        model=MODEL, prompt="ภาษาไทย", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in text_chunks)
    counts = [c.usage.completion_tokens for c in text_chunks]
    assert counts == sorted(counts) and 1 <= counts[-1] <= 8


# ------------------------------------------------------------ chat template options
def test_chat_template_kwargs_reach_the_template(client, http):
    """Template variables are passed on; the template's own options may be given there
    (vLLM lets them override) unless they contradict the request; a template of the
    client's and apply_chat_template's own arguments are refused."""
    messages = [{"role": "user", "content": "สวัสดี"}]
    counted = lambda **extra: http.post("/tokenize", json={"messages": messages, **extra}).json()["count"]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    with_var = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert with_var.usage.prompt_tokens == plain.usage.prompt_tokens == counted()
    no_header = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2,
        extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert no_header.usage.prompt_tokens == counted(add_generation_prompt=False) < plain.usage.prompt_tokens
    assert counted(chat_template_kwargs={"add_generation_prompt": False}) == no_header.usage.prompt_tokens
    for kwargs, extra in (({"chat_template": "{{ 1 }}"}, {}), ({"tokenize": False}, {}),
                          ({"raise_exception": 1}, {}),
                          ({"add_generation_prompt": False}, {"add_generation_prompt": True})):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           extra_body={"chat_template_kwargs": kwargs, **extra})
        assert "chat_template_kwargs" in str(refused.value)


def test_template_variables_are_rendered(demo_checkpoint):
    """What chat_template_kwargs carries is a variable of the template itself."""
    from api.engine.base import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(demo_checkpoint[1]))
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ flavour | default('') }}"
    messages = [{"role": "user", "content": "ab"}]
    assert tokenizer.decode(chat_prompt_ids(tokenizer, messages)) == "ab"
    assert tokenizer.decode(chat_prompt_ids(tokenizer, messages, template_kwargs={"flavour": "ไทย"})) == "abไทย"


def test_assistant_prefill_continue_final_message_and_echo(client, http, tokenizer):
    """vLLM's prefill: the last (assistant) message is continued, not closed; echo puts it
    before the reply; /tokenize with the same options gives the very prompt ids."""
    messages = [{"role": "user", "content": "สวัสดี"}, {"role": "assistant", "content": "ภาษา"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    tokens = http.post("/tokenize", json={"messages": messages, **options}).json()["tokens"]
    assert tokenizer.decode(tokens).endswith("<|im_start|>assistant\nภาษา")
    closed = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert tokenizer.decode(closed["tokens"]).rstrip().endswith("<|im_end|>")
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           temperature=0, extra_body={**options, "echo": True,
                                                                      "return_token_ids": True})
    assert reply.model_extra["prompt_token_ids"] == tokens
    assert reply.usage.prompt_tokens == len(tokens)
    content = reply.choices[0].message.content
    assert content.startswith("ภาษา")
    unechoed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                              temperature=0, extra_body=options)
    assert content == "ภาษา" + unechoed.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
        extra_body={**options, "echo": True}) if c.choices)
    assert streamed == content
    for bad in ({"continue_final_message": True},  # add_generation_prompt defaults to true
                {"add_generation_prompt": False, "continue_final_message": True,
                 "messages": [{"role": "user", "content": "x"}]}):
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, **bad}
        assert http.post("/v1/chat/completions", json=body).status_code == 400


# ------------------------------------------------------------ several prompts
def test_completions_with_a_list_of_prompts(client, tokenizer):
    """Texts or token-id lists; n choices per prompt, indexed prompt by prompt; each choice
    is what that prompt alone gives (greedy), streamed and not; usage counts every prompt."""
    texts = ["ภาษาไทย", "สวัสดี"]
    ids = tokenizer.encode(texts[1])
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0)
             for p in texts]
    batch = client.completions.create(model=MODEL, prompt=texts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert batch.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens
    by_ids = client.completions.create(model=MODEL, prompt=[tokenizer.encode(texts[0]), ids],
                                       max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=texts, max_tokens=5, temperature=0,
                                           n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in batch.choices}


# ------------------------------------------------------------ prompt logprobs, token ids
def test_prompt_logprobs_in_vllms_shape(client, http):
    prompt = "ภาษาไทย"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"prompt_logprobs": 2})
    rows = reply.choices[0].model_extra["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                       echo=True, logprobs=0)
    for token_id, row, logprob in zip(ids[1:], rows[1:], echoed.choices[0].logprobs.token_logprobs[1:]):
        assert str(token_id) in row and len(row) <= 3
        assert row[str(token_id)]["logprob"] == pytest.approx(logprob, abs=1e-4)
        ranked = sorted((v["rank"], -v["logprob"]) for v in row.values() if v["rank"] is not None)
        assert [r for r, _ in ranked] == [1, 2] and ranked == sorted(ranked, key=lambda x: x[1])
        assert all(isinstance(v["decoded_token"], str) for v in row.values())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=2, extra_body={"prompt_logprobs": 0})
    rows = chat.model_extra["prompt_logprobs"]
    assert rows[0] is None and len(rows) == chat.usage.prompt_tokens
    assert all(len(row) == 1 and next(iter(row.values()))["logprob"] <= 0 for row in rows[1:])
    r = http.post("/v1/completions", json={"prompt": prompt, "prompt_logprobs": 1, "stream": True})
    assert r.status_code == 400 and "prompt_logprobs" in r.text


def test_return_token_ids(client, http, tokenizer):
    messages = [{"role": "user", "content": "เล่าเรื่อง"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                           temperature=0, extra_body={"return_token_ids": True})
    assert reply.model_extra["prompt_token_ids"] == tokens
    out = reply.choices[0].model_extra["token_ids"]
    assert len(out) == reply.usage.completion_tokens
    assert tokenizer.decode(out, skip_special_tokens=True) == reply.choices[0].message.content
    streamed, prompt_ids = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                temperature=0, stream=True,
                                                extra_body={"return_token_ids": True}):
        prompt_ids = prompt_ids or (chunk.model_extra or {}).get("prompt_token_ids")
        for choice in chunk.choices:
            streamed += (choice.model_extra or {}).get("token_ids") or []
    assert prompt_ids == tokens and streamed == out
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert "token_ids" not in plain.choices[0].model_extra and "prompt_token_ids" not in plain.model_extra
    text = client.completions.create(model=MODEL, prompt="ภาษา", max_tokens=4, temperature=0,
                                     extra_body={"return_token_ids": True})
    choice = text.choices[0].model_extra
    assert choice["prompt_token_ids"] == tokenizer.encode("ภาษา")
    assert tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == text.choices[0].text
    firsts, streamed = {}, {}
    for chunk in client.completions.create(model=MODEL, prompt=["ภาษา", "สวัสดี"], max_tokens=4,
                                           temperature=0, stream=True,
                                           extra_body={"return_token_ids": True}):
        for c in chunk.choices:
            extra = c.model_extra or {}
            if extra.get("prompt_token_ids") is not None:
                firsts.setdefault(c.index, extra["prompt_token_ids"])
            streamed[c.index] = streamed.get(c.index, []) + (extra.get("token_ids") or [])
    assert firsts == {0: tokenizer.encode("ภาษา"), 1: tokenizer.encode("สวัสดี")}
    assert streamed[0] == choice["token_ids"]


def test_truncate_prompt_tokens(client, http, tokenizer):
    prompt = "ภาษาไทย สวัสดี ครับ " * 4
    ids = tokenizer.encode(prompt)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"truncate_prompt_tokens": 3, "return_token_ids": True})
    assert reply.usage.prompt_tokens == 3
    assert reply.choices[0].model_extra["prompt_token_ids"] == ids[-3:]
    same = client.completions.create(model=MODEL, prompt=ids[-3:], max_tokens=2, temperature=0)
    assert reply.choices[0].text == same.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=2, extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                     extra_body={"truncate_prompt_tokens": -1}).usage.prompt_tokens == len(ids)
    r = http.post("/v1/completions", json={"prompt": prompt, "truncate_prompt_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_version(http):
    from api import __version__

    r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": __version__}
