"""/tokenize, /detokenize and /v1/models/{model} over the fake engine (characters are tokens)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.protocol import MAX_DETOKENIZE_TOKENS
from api.server import create_app
from api.settings import Settings
from tests.fakes import FakeEngine

KEY = "key-t-" + "0123456789abcdef"


def make_client(engine: FakeEngine | None = None, **overrides) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine()
    settings = Settings.from_overrides({"enable_ui": False, **overrides})
    return TestClient(create_app(settings, engine), raise_server_exceptions=False), engine


@pytest.fixture
def served():
    client, engine = make_client()
    with client:
        yield client, engine


@pytest.fixture
def client(served):
    return served[0]


def error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------ /tokenize prompt
def test_tokenize_prompt(served):
    client, engine = served
    r = client.post("/tokenize", json={"model": "thai-qwen-lora", "prompt": "สวัสดี"})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 6, "max_model_len": 4096, "tokens": [ord(c) for c in "สวัสดี"]}
    assert engine.encode_calls == [("encode", True)]  # vLLM: add_special_tokens defaults true


def test_tokenize_prompt_options_and_token_strs(served):
    client, engine = served
    r = client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False,
                                       "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 2, "max_model_len": 4096, "tokens": [97, 98], "token_strs": ["a", "b"]}
    assert engine.encode_calls == [("encode", False)]


def test_tokenize_empty_prompt(client):
    assert client.post("/tokenize", json={"prompt": ""}).json()["count"] == 0


def test_tokenize_long_prompt_off_the_loop(client):
    text = "ก" * 10_000
    assert client.post("/tokenize", json={"prompt": text}).json()["count"] == 10_000


# ---------------------------------------------------------------- /tokenize messages
def test_tokenize_messages_counts_like_chat_usage(client):
    messages = [{"role": "developer", "content": "ตอบสั้น ๆ"},
                {"role": "user", "content": [{"type": "text", "text": "สวัส"}, {"type": "text", "text": "ดี"}]}]
    tok = client.post("/tokenize", json={"messages": messages})
    assert tok.status_code == 200, tok.text
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert tok.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    # developer -> system, parts joined: the chat completion's own normalization
    expected = "<system>ตอบสั้น ๆ<user>สวัสดี"
    assert tok.json()["tokens"] == [ord(c) for c in expected]


def test_tokenize_messages_options(served):
    client, engine = served
    messages = [{"role": "user", "content": "hi"}]
    full = client.post("/tokenize", json={"messages": messages}).json()
    r = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False,
                                       "add_special_tokens": True})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == full["count"] - 1
    assert engine.encode_calls == [("encode_messages", False, True)]


def test_tokenize_messages_limits_and_blank(client):
    err = error(client.post("/tokenize", json={"messages": [{"role": "user", "content": "\u200b "}]}), 400)
    assert "empty" in err["message"]
    error(client.post("/tokenize", json={"messages": []}), 400, "messages")


# ------------------------------------------------------------------ /tokenize errors
@pytest.mark.parametrize("body", [
    {},
    {"model": "thai-qwen-lora"},
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
])
def test_tokenize_needs_exactly_one_shape(client, body):
    err = error(client.post("/tokenize", json=body), 400)
    assert "exactly one of `prompt`" in err["message"]


def test_tokenize_generation_prompt_is_for_messages(client):
    err = error(client.post("/tokenize", json={"prompt": "a", "add_generation_prompt": True}), 400)
    assert "add_generation_prompt" in err["message"]


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"prompt": "a", "temperature": 1}),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}),
    ("/detokenize", {"tokens": [97], "skip_special_tokens": True}),
])
def test_extra_fields_are_refused_by_name(client, path, body):
    err = error(client.post(path, json=body), 400)
    extra = (set(body) - {"prompt", "messages", "tokens"}).pop()
    assert extra in err["message"] or err["param"] == extra, err


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ({"prompt": "a", "return_token_strs": 1}, "return_token_strs"),
])
def test_tokenize_strict_types(client, body, param):
    error(client.post("/tokenize", json=body), 400, param)


def test_tokenize_unknown_model(client):
    err = error(client.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}), 404, "model")
    assert err["code"] == "model_not_found"


def test_tokenize_while_loading_is_503():
    client, _ = make_client(FakeEngine(ready=False))
    with client:
        r = client.post("/tokenize", json={"prompt": "a"})
        assert r.status_code == 503, r.text
        r = client.post("/detokenize", json={"tokens": [97]})
        assert r.status_code == 503, r.text


# ---------------------------------------------------------------------- /detokenize
def test_detokenize_round_trip(client):
    text = "สรุปข่าววันนี้ 123"
    tokens = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    r = client.post("/detokenize", json={"model": "thai-qwen-lora", "tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}


def test_detokenize_empty(client):
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("bad", [-1, FakeEngine.VOCAB_SIZE, 2**63])
def test_detokenize_out_of_vocabulary(client, bad):
    err = error(client.post("/detokenize", json={"tokens": [97, bad]}), 400, "tokens")
    assert str(bad) in err["message"] and "tokens[1]" in err["message"]
    assert err["code"] == "invalid_token_id"


def test_detokenize_huge_id_is_400_not_500(client):
    error(client.post("/detokenize", json={"tokens": [10**40]}), 400)


@pytest.mark.parametrize("tokens", [["a"], [1.5], [True], "abc", None])
def test_detokenize_strict_types(client, tokens):
    error(client.post("/detokenize", json={"tokens": tokens}), 400)


def test_detokenize_missing_tokens(client):
    error(client.post("/detokenize", json={}), 400, "tokens")


def test_detokenize_too_many(client):
    err = error(client.post("/detokenize", json={"tokens": [97] * (MAX_DETOKENIZE_TOKENS + 1)}), 400,
                "tokens")
    assert str(MAX_DETOKENIZE_TOKENS) in err["message"]


def test_detokenize_unknown_model(client):
    assert error(client.post("/detokenize", json={"model": "x", "tokens": [97]}), 404)["code"] == \
        "model_not_found"


# ----------------------------------------------------------------------- model cards
def test_model_cards_have_max_model_len():
    client, _ = make_client(FakeEngine(max_context=2048))
    with client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == "thai-qwen-lora" and card["max_model_len"] == 2048
        r = client.get("/v1/models/thai-qwen-lora")
        assert r.status_code == 200
        assert r.json() == card
        assert client.post("/tokenize", json={"prompt": "a"}).json()["max_model_len"] == 2048


@pytest.mark.parametrize("name", ["gpt-4", "Qwen/Qwen2.5-1.5B-Instruct", "thai-qwen-lora-x"])
def test_retrieve_unknown_model(client, name):
    err = error(client.get(f"/v1/models/{name}"), 404, "model")
    assert err["code"] == "model_not_found" and name in err["message"]


def test_retrieve_route_keeps_slash_redirect_and_takes_org_names():
    client, _ = make_client()
    with client:
        r = client.get("/v1/models/", follow_redirects=False)  # Starlette's redirect, as before
        assert r.status_code == 307 and r.headers["location"].endswith("/v1/models")
    engine = FakeEngine()
    engine.info.model_name = "org/thai-model"
    client, _ = make_client(engine, served_model_name="org/thai-model")
    with client:
        assert client.get("/v1/models/org/thai-model").json()["id"] == "org/thai-model"


def test_endpoints_listed(client):
    endpoints = client.get("/").json()["endpoints"]
    for key in ("POST /tokenize", "POST /detokenize", "GET /v1/models/{model}"):
        assert key in endpoints


# --------------------------------------------------------------------------- API keys
@pytest.mark.parametrize("method,path,body", [
    ("post", "/tokenize", {"prompt": "a"}),
    ("post", "/detokenize", {"tokens": [97]}),
    ("get", "/v1/models/thai-qwen-lora", None),
])
def test_keys_required(method, path, body):
    client, _ = make_client(api_keys=KEY)
    with client:
        kwargs = {"json": body} if body is not None else {}
        assert getattr(client, method)(path, **kwargs).status_code == 401
        r = getattr(client, method)(path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
        assert r.status_code == 200, r.text


# ----------------------------------------------- the real server on the demo checkpoint
@pytest.fixture(scope="module")
def live_client(live_server):
    import openai

    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="not-required-for-local")


def test_live_tokenize_messages_equals_chat_usage(live_server, live_client):
    import httpx

    messages = [{"role": "system", "content": "ตอบสั้น ๆ"},
                {"role": "user", "content": "สรุปประโยชน์ของการออกกำลังกาย"}]
    r = httpx.post(live_server.url + "/tokenize", json={"model": "thai-qwen-lora", "messages": messages},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    response = live_client.chat.completions.create(model="thai-qwen-lora", messages=messages,
                                                   max_tokens=4)
    assert body["count"] == len(body["tokens"]) == response.usage.prompt_tokens
    models = live_client.models.list()
    assert body["max_model_len"] == models.data[0].model_extra["max_model_len"] > 0
    plain = httpx.post(live_server.url + "/tokenize", json={"messages": messages,
                                                            "add_generation_prompt": False}, timeout=30)
    assert plain.status_code == 200 and plain.json()["count"] < body["count"]


def test_live_tokenize_detokenize_round_trip(live_server):
    import httpx

    text = "ประเทศไทยมีประชากรประมาณ 70 ล้านคน"
    r = httpx.post(live_server.url + "/tokenize", json={"prompt": text, "return_token_strs": True},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0
    back = httpx.post(live_server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=30)
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}
    bad = httpx.post(live_server.url + "/detokenize", json={"tokens": [1, 10**9]}, timeout=30)
    assert bad.status_code == 400 and "1000000000" in bad.json()["error"]["message"]


def test_live_models_retrieve(live_client):
    import openai

    card = live_client.models.retrieve("thai-qwen-lora")
    assert card.id == "thai-qwen-lora" and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        live_client.models.retrieve("gpt-4")


def test_live_keys_required(model_env, tmp_path):
    import httpx

    from tests.support import start_server

    server = start_server({**model_env, "THAI_API_KEYS": KEY, "THAI_ENABLE_UI": "false"}, tmp_path)
    try:
        for path, body in (("/tokenize", {"prompt": "ก"}), ("/detokenize", {"tokens": [0]})):
            assert httpx.post(server.url + path, json=body, timeout=30).status_code == 401
            r = httpx.post(server.url + path, json=body, timeout=30,
                           headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, r.text
        assert httpx.get(server.url + "/v1/models/thai-qwen-lora", timeout=30).status_code == 401
    finally:
        server.stop()
