"""POST /v1/completions (OpenAI's legacy text completions, vLLM's dialect): over the fake engine
(tokens are characters, the reply is the prompt reversed), then live with the ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from api.server import create_app
from api.settings import Settings
from tests.fakes import FakeEngine
from tests.test_api_live import client, tokenizer  # noqa: F401  (the live fixtures)


@pytest.fixture
def fake():
    engine = FakeEngine()
    app = create_app(Settings.from_overrides({"enable_ui": False}), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "thai-qwen-lora", "prompt": "สวัสดี", **body})


def sse(response) -> list:
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_shape(fake):
    client, engine = fake
    r = complete(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "thai-qwen-lora" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "สวัสดี"[::-1], "finish_reason": "stop",
                                "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 6, "total_tokens": 12}
    request = engine.requests[-1]
    assert request.prompt_ids == [ord(c) for c in "สวัสดี"] and request.plain_prompt
    assert request.params.no_repeat_ngram_size == 0, "plain completions block no n-grams unless asked"
    assert engine.encode_calls[-1] == ("encode", True)


def test_token_id_prompts_and_one_prompt_lists(fake):
    client, engine = fake
    ids = [ord(c) for c in "abc"]
    for prompt in (ids, [ids], ["abc"]):
        r = complete(client, prompt=prompt)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "cba"
        assert engine.requests[-1].prompt_ids == ids
    # several prompts: n choices each, indexed prompt by prompt (OpenAI's and vLLM's order)
    for prompt in (["ab", "xyz"], [[97, 98], [120, 121, 122]]):
        r = complete(client, prompt=prompt, n=2)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [(c["index"], c["text"]) for c in body["choices"]] == [
            (0, "ba"), (1, "ba"), (2, "zyx"), (3, "zyx")]
        assert body["usage"]["prompt_tokens"] == 2 + 3
        assert body["usage"]["completion_tokens"] == 2 * 2 + 2 * 3
    r = complete(client, prompt=["a"] * 65)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = complete(client, prompt=["a"] * 8, n=16)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert complete(client, prompt=["a", ""]).status_code == 400
    r = complete(client, prompt=[97, FakeEngine.VOCAB_SIZE])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_token_id"
    assert r.json()["error"]["param"] == "prompt"
    assert complete(client, prompt=[-1]).status_code == 400
    assert complete(client, prompt="").status_code == 400
    assert complete(client, prompt=[]).status_code == 400


def test_echo_stop_and_sampling_fields(fake):
    client, engine = fake
    r = complete(client, prompt="abcd", echo=True, max_tokens=2)
    assert r.json()["choices"][0]["text"] == "abcd" + "dc"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = complete(client, prompt=[ord(c) for c in "xy"], echo=True)
    assert r.json()["choices"][0]["text"] == "xyyx"
    r = complete(client, stop="x", temperature=0.0, top_p=0.5, seed=3, min_tokens=1, ignore_eos=True,
                 no_repeat_ngram_size=2, user="someone")
    assert r.status_code == 200, r.text
    p = engine.requests[-1].params
    assert (p.stop, p.temperature, p.top_p, p.seed, p.min_tokens, p.ignore_eos,
            p.no_repeat_ngram_size) == (("x",), 0.0, 0.5, 3, 1, True, 2)
    assert complete(client, stop=["a", "b"]).status_code == 200
    assert engine.requests[-1].params.stop == ("a", "b")
    r = complete(client, max_tokens=10**6)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert complete(client, model="other").status_code == 404


def test_no_op_values_are_accepted(fake):
    client, _ = fake
    r = complete(client, n=1, logprobs=None, best_of=1, frequency_penalty=0.0, presence_penalty=0.0,
                 suffix=None, stream_options=None)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value, attribute, expected", [
    ("logprobs", 1, "logprobs", 1), ("frequency_penalty", 0.5, "frequency_penalty", 0.5),
    ("presence_penalty", -1.0, "presence_penalty", -1.0), ("logit_bias", {"1": 5}, "logit_bias", ((1, 5.0),)),
    ("repetition_penalty", 1.1, "repetition_penalty", 1.1), ("top_k", 3, "top_k", 3),
    ("min_p", 0.2, "min_p", 0.2), ("stop_token_ids", [7], "stop_token_ids", (7,)),
])
def test_sampling_fields_reach_the_engine(fake, field, value, attribute, expected):
    client, engine = fake
    r = complete(client, **{field: value})
    assert r.status_code == 200, r.text
    assert getattr(engine.requests[-1].params, attribute) == expected


def test_n_choices_are_separate_sequences_and_unknown_fields_are_refused(fake):
    client, engine = fake
    r = complete(client, prompt="abc", n=3, best_of=3, seed=5)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert [g.params.seed for g in engine.requests[-3:]] == [5, 6, 7]
    assert r.json()["usage"]["prompt_tokens"] == 3, "the prompt is counted once"
    for body, param in (({"best_of": 2}, "best_of"), ({"stream_interval": 2}, "stream_interval")):
        r = complete(client, **body)
        assert r.status_code == 400 and param in r.json()["error"]["message"], r.text


def test_suffix_is_refused(fake):
    client, _ = fake
    r = complete(client, suffix="end")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "suffix" and "not supported" in r.json()["error"]["message"]


def test_strict_types(fake):
    client, _ = fake
    assert complete(client, max_tokens="5").status_code == 400
    assert complete(client, prompt=[True]).status_code == 400
    assert complete(client, echo=1).status_code == 400


def test_stream_order_echo_and_usage(fake):
    client, _ = fake
    r = complete(client, prompt="abc", stream=True, echo=True,
                 stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("cmpl-")
    assert all(e["object"] == "text_completion" for e in events)
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert texts[0] == "abc", "the echoed prompt comes first"
    assert "".join(texts) == "abc" + "cba"
    reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    plain = sse(complete(client, prompt="abc", stream=True))
    assert all(e["usage"] is None and e["choices"] for e in plain)
    assert "".join(e["choices"][0]["text"] for e in plain) == "cba"


def test_stream_admission_errors_come_before_the_stream(fake):
    client, _ = fake
    r = complete(client, prompt="x" * 5000, max_tokens=10, stream=True)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_mid_stream_failure_is_an_error_event():
    engine = FakeEngine(fail=RuntimeError("boom"))
    app = create_app(Settings.from_overrides({"enable_ui": False}), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        events = sse(complete(client, prompt="abc", stream=True))
    assert events[0]["choices"][0]["text"] == "c"
    assert "error" in events[-1] and "choices" not in events[-1]
    assert engine.streams[-1].closed


def test_listed_on_the_root(fake):
    client, _ = fake
    assert "POST /v1/completions" in client.get("/").json()["endpoints"]


# ------------------------------------------------------------------------------ live
PROMPT = "ประเทศไทยมีจังหวัด"


def test_live_text_and_token_id_prompts_agree(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    text = client.completions.create(model="thai-qwen-lora", prompt=PROMPT, max_tokens=8,
                                          temperature=0)
    by_ids = client.completions.create(model="thai-qwen-lora", prompt=ids, max_tokens=8,
                                            temperature=0)
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert text.choices[0].text == by_ids.choices[0].text
    assert text.choices[0].finish_reason in ("stop", "length")
    assert text.usage.prompt_tokens == len(ids) == by_ids.usage.prompt_tokens
    assert 1 <= text.usage.completion_tokens <= 8
    echoed = client.completions.create(model="thai-qwen-lora", prompt=PROMPT, max_tokens=8,
                                            temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + text.choices[0].text


def test_live_stream(client):
    plain = client.completions.create(model="thai-qwen-lora", prompt=PROMPT, max_tokens=8,
                                           temperature=0)
    chunks = list(client.completions.create(
        model="thai-qwen-lora", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_live_refusals(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="thai-qwen-lora", prompt=PROMPT, suffix="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="guided_decoding_backend"):
        client.completions.create(model="thai-qwen-lora", prompt=PROMPT, max_tokens=2,
                                  extra_body={"guided_decoding_backend": "xgrammar"})


def test_an_upstream_engine_gets_the_unknown_fields():
    engine = FakeEngine()
    engine.info.engine = "openai"
    app = create_app(Settings.from_overrides({"enable_ui": False}), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = complete(client, repetition_penalty=1.1, frequency_penalty=0.5, no_repeat_ngram_size=3,
                     n=1, logprobs=None)
        assert r.status_code == 200, r.text
        assert engine.requests[-1].passthrough == {"repetition_penalty": 1.1, "frequency_penalty": 0.5,
                                                   "no_repeat_ngram_size": 3}
        assert complete(client).status_code == 200
        assert engine.requests[-1].passthrough == {}
        for field, value in (("n", 2), ("logprobs", 1), ("best_of", 3), ("suffix", "x")):
            r = complete(client, **{field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field
