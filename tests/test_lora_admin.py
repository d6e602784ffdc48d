"""Adapters as models through the real server: /v1/models lists them with their parent,
the request's model picks one (the openai SDK, mixed concurrent requests), and vLLM's
load/unload routes work with the admin key only, only under THAI_LORA_ROOT, only for
safetensors adapters of this base."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from api.engine.demo_checkpoint import derive_adapter
from tests.support import start_server

API_KEY = "user-key-123456"
ADMIN_KEY = "admin-key-abcdef"
PROMPTS = ["สวัสดีครับ", "hello", "ข่าววันนี้เกี่ยวกับเศรษฐกิจไทย"]


@pytest.fixture(scope="module")
def lora_root(demo_checkpoint, tmp_path_factory):
    """Adapters under the allowed root: B (for start-up), C (same weights as B, for loading),
    a pickle, and one with the wrong shapes."""
    _, lora = demo_checkpoint
    root = tmp_path_factory.mktemp("adapters")
    derive_adapter(lora, root / "b", seed=1)
    derive_adapter(lora, root / "c", seed=1)
    pickle = root / "pickle"
    pickle.mkdir()
    shutil.copy(lora / "adapter_config.json", pickle)
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    wrong = root / "wrong_rank"
    shutil.copytree(lora, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["r"] = 4  # the weights have rank 8: not this base's shapes for r=4
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    # base_model_name_or_path "../base" is relative to each folder: point it at the base
    for folder in (root / "b", root / "c", wrong):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(demo_checkpoint[0])
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def server(model_env, lora_root, tmp_path_factory):
    env = {**model_env, "THAI_LORA_MODULES": f"B={lora_root / 'b'}", "THAI_API_KEYS": API_KEY,
           "THAI_ADMIN_KEYS": ADMIN_KEY, "THAI_LORA_ROOT": str(lora_root),
           "THAI_ENABLE_UI": "false"}
    proc = start_server(env, tmp_path_factory.mktemp("lora-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(demo_checkpoint, lora_root):
    """Greedy chat texts of engines with A (the demo adapter) or B merged, in process."""
    from api.engine.transformers_engine import TransformersEngine
    from api.engine.types import GenerationRequest, SamplingParams
    from api.settings import ModelSettings

    base, lora = demo_checkpoint

    async def texts(path):
        engine = TransformersEngine(ModelSettings(base_model=str(base), lora_path=str(path),
                                                  require_model=True, dtype="float32",
                                                  quantization="none"))
        await engine.start()
        await engine.wait_ready()
        try:
            out = []
            for prompt in PROMPTS:
                ids = engine.encode_chat([{"role": "user", "content": prompt}])
                params = SamplingParams(max_tokens=16, temperature=0.0, no_repeat_ngram_size=0)
                out.append("".join([c.text async for c in engine.generate(
                    GenerationRequest(ids, params))]))
            return out
        finally:
            await engine.stop()

    return {"thai-qwen-lora": asyncio.run(texts(lora)), "B": asyncio.run(texts(lora_root / "b"))}


def chat(client: openai.OpenAI, model: str, prompt: str) -> str:
    answer = client.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                            messages=[{"role": "user", "content": prompt}])
    assert answer.model == model  # the request's model is echoed, as vLLM does
    return answer.choices[0].message.content


def admin(server, route: str, body: dict, key: str | None = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/{route}", json=body, headers=headers, timeout=60)


def test_models_list_adapters_with_the_base_as_parent(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:3] == ["thai-qwen-lora", "base", "B"]
    assert cards["B"].parent == "base" and cards["thai-qwen-lora"].parent == "base"
    assert cards["base"].parent is None
    assert client.models.retrieve("B").id == "B"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


def test_model_picks_the_adapter_alone_and_mixed(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    for model, texts in reference.items():
        assert [chat(client, model, p) for p in PROMPTS] == texts, model
    jobs = [(model, i) for model in reference for i in range(len(PROMPTS))] * 2
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(lambda job: chat(client, job[0], PROMPTS[job[1]]), jobs))
    assert mixed == [reference[model][i] for model, i in jobs]


def test_summaries_run_the_requested_adapter(server):
    """/v1/summarize takes the adapter too: never accepted and silently ignored."""
    def summary(model):
        reply = httpx.post(f"{server.url}/v1/summarize", timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"text": "ข่าววันนี้เกี่ยวกับเศรษฐกิจไทยและการท่องเที่ยว " * 3,
                                 "model": model, "temperature": 0, "max_tokens": 12})
        return reply.status_code, reply.json()

    (ok_a, a), (ok_b, b), (ok_b2, b2) = summary("thai-qwen-lora"), summary("B"), summary("B")
    assert ok_a == ok_b == ok_b2 == 200
    assert b["summary"] == b2["summary"] != a["summary"]
    status, body = summary("nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_admin_routes_need_the_admin_key(server):
    body = {"lora_name": "C", "lora_path": "c"}
    assert admin(server, "load_lora_adapter", body, key=None).status_code == 401
    assert admin(server, "load_lora_adapter", body, key=API_KEY).status_code == 401
    wrong = admin(server, "load_lora_adapter", body, key="not-the-admin-key")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_key"
    assert admin(server, "unload_lora_adapter", {"lora_name": "B"}, key=API_KEY).status_code == 401


def test_load_refuses_outside_the_root_pickles_and_other_shapes(server, demo_checkpoint):
    _, lora = demo_checkpoint
    outside = admin(server, "load_lora_adapter", {"lora_name": "X", "lora_path": str(lora)})
    assert outside.status_code == 403, outside.text
    escape = admin(server, "load_lora_adapter", {"lora_name": "X", "lora_path": "../x"})
    assert escape.status_code == 403
    pickle = admin(server, "load_lora_adapter", {"lora_name": "X", "lora_path": "pickle"})
    assert pickle.status_code == 400 and "pickle" in pickle.json()["error"]["message"]
    wrong = admin(server, "load_lora_adapter", {"lora_name": "X", "lora_path": "wrong_rank"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_lora_adapter"
    taken = admin(server, "load_lora_adapter", {"lora_name": "B", "lora_path": "c"})
    assert taken.status_code == 400
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models",
                                      headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]]
    assert "X" not in ids


def test_load_serve_and_unload_at_run_time(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    loaded = admin(server, "load_lora_adapter", {"lora_name": "C", "lora_path": "c"})
    assert loaded.status_code == 200 and "C" in loaded.text
    assert "C" in [m.id for m in client.models.list().data]
    assert chat(client, "C", PROMPTS[0]) == reference["B"][0]  # C holds B's weights
    # an unload while a request uses C is refused; that request finishes whole
    stream = client.chat.completions.create(
        model="C", stream=True, max_tokens=400, temperature=0,
        messages=[{"role": "user", "content": PROMPTS[1]}], extra_body={"ignore_eos": True},
        stream_options={"include_usage": True})
    first = next(iter(stream))
    assert first.choices[0].delta is not None
    busy = admin(server, "unload_lora_adapter", {"lora_name": "C"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "lora_adapter_in_use"
    usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    assert usage.completion_tokens == 400
    gone = admin(server, "unload_lora_adapter", {"lora_name": "C"})
    assert gone.status_code == 200, gone.text
    with pytest.raises(openai.NotFoundError):
        chat(client, "C", PROMPTS[0])
    assert admin(server, "unload_lora_adapter", {"lora_name": "C"}).status_code == 404


def test_admin_routes_are_off_without_admin_keys(live_server):
    refused = httpx.post(f"{live_server.url}/v1/load_lora_adapter",
                         json={"lora_name": "C", "lora_path": "c"},
                         headers={"Authorization": "Bearer anything-at-all"}, timeout=30)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "admin_routes_off"
