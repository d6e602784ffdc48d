"""The quantized-weight cache (THAI_QUANT_CACHE_DIR) on the demo checkpoint, through the real
loader and a real server: a second start reads the cache and computes exactly what the first
did; another checkpoint (by content) or setting misses; a damaged entry is rebuilt."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from api.engine.loader import load_model_bundle
from api.engine.quant_cache import META, WEIGHTS
from api.settings import ModelSettings
from tests.support import start_server

CACHED = "[loaded from the quantized-weight cache"
TEXT = "สวัสดีครับ วันนี้อากาศดีมาก"


def load(base, lora, cache, **kw):
    settings = dict(base_model=str(base), lora_path=str(lora), device="cpu", dtype="float32",
                    quantization="w8a8", require_model=True, quant_cache_dir=str(cache))
    return load_model_bundle(ModelSettings(**{**settings, **kw}))


def logits(bundle) -> torch.Tensor:
    ids = torch.tensor([bundle.tokenizer(TEXT)["input_ids"]])
    with torch.inference_mode():
        return bundle.model(ids).logits


def entries(cache) -> list:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("quantization", ["w8a8", "int8", "int4"])
def test_second_start_reads_the_cache_and_computes_the_same(demo_checkpoint, tmp_path, quantization):
    base, lora = demo_checkpoint
    first = load(base, lora, tmp_path, quantization=quantization)
    assert CACHED not in first.quantization_reason
    assert len(entries(tmp_path)) == 1
    meta = json.loads((entries(tmp_path)[0] / META).read_text())
    assert meta["runs"] == quantization and meta["made_from"]["quantization"] == quantization
    second = load(base, lora, tmp_path, quantization=quantization)
    assert second.quantization == quantization
    assert second.quantization_reason.startswith(first.quantization_reason + " " + CACHED)
    assert torch.equal(logits(first), logits(second))
    assert second.eos_token_ids == first.eos_token_ids
    assert second.max_context == first.max_context
    assert type(second.model.lm_head) is type(first.model.lm_head)
    assert not any(t.is_meta for t in second.model.state_dict().values())


def test_content_decides_a_copy_hits_an_edit_misses(demo_checkpoint, tmp_path):
    base, lora = demo_checkpoint
    cache = tmp_path / "cache"
    load(base, lora, cache)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy / "base")
    shutil.copytree(lora, copy / "lora")
    assert CACHED in load(copy / "base", copy / "lora", cache).quantization_reason
    config = copy / "lora" / "adapter_config.json"
    config.write_text(config.read_text() + "\n")  # same adapter, other bytes: another key
    assert CACHED not in load(copy / "base", copy / "lora", cache).quantization_reason
    assert len(entries(cache)) == 2


def test_another_setting_misses(demo_checkpoint, tmp_path):
    base, lora = demo_checkpoint
    load(base, lora, tmp_path, quantization="w8a8")
    assert CACHED not in load(base, lora, tmp_path, quantization="int8").quantization_reason
    assert CACHED not in load(base, lora, tmp_path, quantization="w8a8",
                              dtype="bfloat16").quantization_reason
    assert len(entries(tmp_path)) == 3
    assert CACHED in load(base, lora, tmp_path, quantization="w8a8").quantization_reason


def test_none_and_off_write_nothing(demo_checkpoint, tmp_path):
    base, lora = demo_checkpoint
    load(base, lora, tmp_path / "a", quantization="none")
    assert not (tmp_path / "a").exists() or entries(tmp_path / "a") == []
    off = load(base, lora, "", quantization="w8a8")
    assert off.quantization == "w8a8" and CACHED not in off.quantization_reason


@pytest.mark.parametrize("damage", ["truncate", "header", "meta"])
def test_a_damaged_entry_is_ignored_and_rebuilt(demo_checkpoint, tmp_path, damage):
    base, lora = demo_checkpoint
    reference = logits(load(base, lora, tmp_path))
    entry = entries(tmp_path)[0]
    weights = entry / WEIGHTS
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "header":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"x" * 32
        weights.write_bytes(bytes(data))
    else:
        (entry / META).write_text("{not json")
    rebuilt = load(base, lora, tmp_path)
    assert CACHED not in rebuilt.quantization_reason
    assert torch.equal(logits(rebuilt), reference)
    again = load(base, lora, tmp_path)
    assert CACHED in again.quantization_reason
    assert torch.equal(logits(again), reference)


@pytest.fixture(scope="module")
def cached_server(demo_checkpoint, tmp_path_factory):
    base, lora = demo_checkpoint
    cache = tmp_path_factory.mktemp("quant-cache")
    first = load(base, lora, cache, quantization="auto", quantization_max_kl=10)
    env = {"THAI_BASE_MODEL": str(base), "THAI_LORA_PATH": str(lora), "THAI_REQUIRE_MODEL": "true",
           "THAI_DTYPE": "float32", "THAI_QUANTIZATION": "auto", "THAI_QUANTIZATION_MAX_KL": "10",
           "THAI_QUANT_CACHE_DIR": str(cache), "THAI_ENABLE_UI": "false"}
    server = start_server(env, tmp_path_factory.mktemp("quant-cache-logs"), timeout=600)
    try:
        yield server, first
    finally:
        server.stop()


def test_server_started_from_the_cache_says_so_and_answers_alike(cached_server):
    server, first = cached_server
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert "quantized weights loaded from the cache" in server.log()
    assert health["quantization"] == "w8a8" == first.quantization
    assert health["quantization_reason"].startswith(first.quantization_reason + " " + CACHED)
    body = {"model": "thai-qwen-lora", "prompt": TEXT, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    ids = first.tokenizer(TEXT)["input_ids"]
    with torch.inference_mode():
        out = first.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=list(first.eos_token_ids))
    expected = first.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert reply.json()["choices"][0]["text"] == expected


def test_int4_layer_is_the_linear_within_4bit_rounding():
    """THAI_QUANTIZATION=int4's layer (torch's CPU int4 kernel) against the bf16 linear it
    replaces, for one row (decode) and many (prefill): 4-bit rounding of uniform weights
    moves outputs by a few percent, a wrong packing or group layout by ~100%."""
    from torch import nn

    from api.engine.quantize import Int4Linear

    torch.manual_seed(0)
    linear = nn.Linear(256, 384).to(torch.bfloat16)
    layer = Int4Linear.from_linear(linear)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 256 * 384 // 2
    for rows in (1, 40):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        ref = linear(x).float()
        error = ((layer(x).float() - ref).norm() / ref.norm()).item()
        assert error < 0.1, (rows, error)


def test_auto_refusal_is_kept_and_not_measured_again(demo_checkpoint, tmp_path):
    """auto measured w8a8 above its bound: the next start with the same weights and bound
    loads them unquantized at once, with the measured verdict; another bound measures anew."""
    base, lora = demo_checkpoint
    first = load(base, lora, tmp_path, quantization="auto", quantization_max_kl=1e-9)
    assert first.quantization == "none" and "measured w8a8 at KL " in first.quantization_reason
    meta = json.loads((entries(tmp_path)[0] / META).read_text())
    assert meta["runs"] == "none" and not (entries(tmp_path)[0] / WEIGHTS).exists()
    second = load(base, lora, tmp_path, quantization="auto", quantization_max_kl=1e-9)
    assert second.quantization == "none"
    assert second.quantization_reason == (first.quantization_reason +
                                          " [verdict kept in the quantized-weight cache]")
    assert torch.equal(logits(first), logits(second))
    lenient = load(base, lora, tmp_path, quantization="auto", quantization_max_kl=10)
    assert lenient.quantization == "w8a8" and CACHED not in lenient.quantization_reason
