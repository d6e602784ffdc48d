"""Several LoRA adapters over one base, in process: each request's adapter applied per row
gives what that adapter merged gives, alone and in one mixed batch; adapters are checked
against the base before they serve."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from api.engine.demo_checkpoint import derive_adapter
from api.engine.errors import AdapterError, AdapterInUseError, UnknownModelError
from api.engine.lora import LoraLinear, RowGroups, read_adapter
from api.engine.transformers_engine import TransformersEngine
from api.engine.types import GenerationRequest, SamplingParams
from api.settings import ModelSettings

PROMPTS = ["สวัสดีครับ", "ประเทศไทยมีจังหวัดกี่จังหวัด ตอบให้ละเอียด", "hello",
           "ข่าววันนี้เกี่ยวกับเศรษฐกิจไทยและการท่องเที่ยว"]


@pytest.fixture(scope="module")
def adapters(demo_checkpoint):
    """(base, adapter A: the demo's, adapter B: A's config with other B matrices)."""
    base, lora = demo_checkpoint
    lora_b = derive_adapter(lora, lora.parent / "lora_b", seed=1)
    return base, lora, lora_b


async def started(base, lora, **overrides) -> TransformersEngine:
    settings = {"base_model": str(base), "lora_path": str(lora), "require_model": True,
                "dtype": "float32", "quantization": "none", **overrides}
    engine = TransformersEngine(ModelSettings(**settings))
    await engine.start()
    await engine.wait_ready()
    assert engine.ready, engine.error
    return engine


async def ids_of(engine, prompt, model=None, max_tokens=20) -> list[int]:
    """Greedy token ids (through the logprobs, which name each token)."""
    ids = engine.encode_chat([{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, no_repeat_ngram_size=0,
                            logprobs=0)
    chunks = [c async for c in engine.generate(GenerationRequest(ids, params, model=model))]
    return [lp.token_id for c in chunks for lp in c.logprobs]


def test_each_adapter_per_row_matches_it_merged_alone_and_mixed(adapters):
    """model=A (the served name), model=B and the base's name at temperature 0 in float32:
    token for token what an engine with that adapter merged (or none) generates, one at a
    time and all in one batch."""
    base, lora_a, lora_b = adapters

    async def main():
        reference = {}
        for key, path in (("A", lora_a), ("B", lora_b), ("base", "")):
            engine = await started(base, path)
            try:
                assert type(engine.bundle.model).__name__ == "Qwen2ForCausalLM"  # merged
                reference[key] = [await ids_of(engine, p) for p in PROMPTS]
            finally:
                await engine.stop()
        engine = await started(base, lora_a, lora_modules=[f"B={lora_b}"])
        try:
            names = [(m.name, m.parent) for m in engine.served_models()]
            assert names == [("thai-qwen-lora", "base"), ("base", None), ("B", "base")]
            alone = {key: [await ids_of(engine, p, model) for p in PROMPTS]
                     for key, model in (("A", None), ("B", "B"), ("base", "base"))}
            picks = [("A", None), ("B", "B"), ("base", "base"), ("A", "thai-qwen-lora")] * 2
            mixed = await asyncio.gather(*[ids_of(engine, PROMPTS[i % len(PROMPTS)], model)
                                           for i, (_, model) in enumerate(picks)])
            hits = engine.scheduler._prefixes
        finally:
            await engine.stop()
        return reference, alone, picks, mixed, hits

    reference, alone, picks, mixed, prefixes = asyncio.run(main())
    assert reference["A"] != reference["B"] != reference["base"]
    assert alone == reference
    for i, (key, _) in enumerate(picks):
        assert mixed[i] == reference[key][i % len(PROMPTS)], (i, key)
    assert len(prefixes) >= 3  # one prefix cache per adapter, never shared


def test_runtime_load_unload_and_refusals(adapters, tmp_path):
    """An adapter loaded at run time serves at once; unloading it waits for nobody: it is
    refused while a request uses it (which finishes whole), then done; unknown names 404."""
    base, lora_a, lora_b = adapters

    async def main():
        engine = await started(base, lora_a, enable_lora=True)
        try:
            await engine.load_adapter("C", str(lora_b))
            assert "C" in [m.name for m in engine.served_models()]
            got_c = await ids_of(engine, PROMPTS[0], "C")
            with pytest.raises(AdapterError, match="already served"):
                await engine.load_adapter("C", str(lora_b))
            # in use: a long generation on C is running
            ids = engine.encode_chat([{"role": "user", "content": PROMPTS[1]}])
            stream = engine.generate(GenerationRequest(ids, SamplingParams(
                max_tokens=400, temperature=0.0, ignore_eos=True, no_repeat_ngram_size=0),
                model="C"))
            first = await stream.__anext__()
            with pytest.raises(AdapterInUseError):
                await engine.unload_adapter("C")
            rest = [c async for c in stream]
            last = (rest or [first])[-1]
            assert last.finished and last.finish_reason == "length" and last.completion_tokens == 400
            await engine.unload_adapter("C")
            with pytest.raises(UnknownModelError):
                engine.generate(GenerationRequest(ids, SamplingParams(), model="C"))
            with pytest.raises(UnknownModelError):
                await engine.unload_adapter("C")
            with pytest.raises(AdapterError, match="base model"):
                await engine.unload_adapter("base")
        finally:
            await engine.stop()
        engine = await started(base, lora_b)
        try:
            ref_b = await ids_of(engine, PROMPTS[0])
        finally:
            await engine.stop()
        return got_c, ref_b

    got_c, ref_b = asyncio.run(main())
    assert got_c == ref_b


def test_quantized_base_with_unmerged_adapters(adapters):
    """w8a8 (int8 where fbgemm is missing) quantizes the base inside the LoRA wrappers; the
    deltas stay in float32 and still change the output per row."""
    from api.engine.quantize import w8a8_supported

    base, lora_a, lora_b = adapters
    quant = "w8a8" if w8a8_supported() is None else "int8"

    async def main():
        engine = await started(base, lora_a, lora_modules=[f"B={lora_b}"], quantization=quant)
        try:
            layer = next(m for m in engine.bundle.model.modules() if isinstance(m, LoraLinear))
            kind = type(layer.base).__name__
            outs = [await ids_of(engine, PROMPTS[1], model) for model in (None, "B", "base")]
        finally:
            await engine.stop()
        return engine.info.quantization, kind, outs

    quantization, kind, outs = asyncio.run(main())
    assert quantization == quant and kind in ("W8A8Linear", "Int8Linear")
    assert all(outs) and outs[0] != outs[1] and outs[1] != outs[2]


def test_row_groups_apply_each_rows_delta_only():
    """The wrapper adds x @ A^T @ B^T to exactly the rows of each adapter."""
    torch.manual_seed(0)
    rows = RowGroups()
    layer = LoraLinear(torch.nn.Linear(6, 5), rows)
    a1, b1, a2, b2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(3, 6), torch.randn(5, 3)
    layer.weights = {1: (a1, b1), 2: (a2, b2)}
    x = torch.randn(4, 3, 6)
    base = layer.base(x)
    rows.set([1, 0, 2, 1], torch.device("cpu"))
    out = layer(x)
    expected = base.clone()
    for i, (a, b) in {0: (a1, b1), 2: (a2, b2), 3: (a1, b1)}.items():
        expected[i] += x[i] @ a.t() @ b.t()
    torch.testing.assert_close(out, expected)
    rows.set([2, 2], torch.device("cpu"))
    torch.testing.assert_close(layer(x[:2]), layer.base(x[:2]) + x[:2] @ a2.t() @ b2.t())
    # A slot this layer has no weights for (an adapter targeting other modules) adds nothing.
    rows.set([3, 2, 3, 0], torch.device("cpu"))
    expected = base.clone()
    expected[1] += x[1] @ a2.t() @ b2.t()
    torch.testing.assert_close(layer(x), expected)
    rows.set([3, 0, 3, 0], torch.device("cpu"))
    torch.testing.assert_close(layer(x), base)


def test_adapter_checks_refuse_pickles_wrong_shapes_ranks_and_bases(adapters, tmp_path):
    base, lora_a, _ = adapters
    targets = {f"model.layers.{i}.self_attn.{p}": LoraLinear(torch.nn.Linear(64, out), RowGroups())
               for i in range(2) for p, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32),
                                                ("o_proj", 64))}

    def read(folder, **kw):
        return read_adapter("x", folder, base_model=str(base), max_rank=kw.get("max_rank", 64),
                            targets=kw.get("targets", targets), dtype=torch.float32, device="cpu")

    assert read(lora_a).rank == 8
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    shutil.copy(lora_a / "adapter_config.json", pickle)
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterError, match="pickle"):
        read(pickle)
    with pytest.raises(AdapterError, match="above THAI_MAX_LORA_RANK"):
        read(lora_a, max_rank=4)
    narrow = {name: LoraLinear(torch.nn.Linear(32, 32), RowGroups()) for name in targets}
    with pytest.raises(AdapterError, match="A \\(8, 64\\)"):
        read(lora_a, targets=narrow)
    with pytest.raises(AdapterError, match="not a linear layer"):
        read(lora_a, targets={})
    other = tmp_path / "other_base"
    shutil.copytree(lora_a, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="trained on"):
        read(other)
    config.update(base_model_name_or_path="../base", use_dora=True)
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="DoRA"):
        read(other)


def test_start_refuses_a_bad_module_with_one_message(adapters, tmp_path):
    base, lora_a, _ = adapters

    async def main():
        engine = TransformersEngine(ModelSettings(
            base_model=str(base), lora_path=str(lora_a), require_model=True, dtype="float32",
            quantization="none", lora_modules=[f"B={tmp_path}"]))
        await engine.start()
        await engine.wait_ready()
        return engine.error

    error = asyncio.run(main())
    assert error and "adapter 'B'" in error and "adapter_model.safetensors" in error


def test_the_upstream_engine_passes_the_adapter_name_through():
    """THAI_ENGINE=openai: THAI_LORA_MODULES's names are models here and the upstream's model
    (vLLM serves its --lora-modules by name); other names stay 404s."""
    from api.engine.upstream_engine import UpstreamEngine

    engine = UpstreamEngine(ModelSettings(engine="openai", upstream_urls=["http://u:1"],
                                          lora_modules=["news=/unused"]))
    assert [(m.name, m.parent) for m in engine.served_models()] == [
        ("thai-qwen-lora", None), ("news", "thai-qwen-lora")]
    assert engine.serves("news") and not engine.serves("legal")
    chat = [{"role": "user", "content": "สวัสดี"}]
    body = engine.body(GenerationRequest([1], SamplingParams(), messages=chat, model="news"))
    assert body["model"] == "news"
    assert engine.body(GenerationRequest([1], SamplingParams(), messages=chat))["model"] == \
        "thai-qwen-lora"
