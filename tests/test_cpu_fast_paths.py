"""The CPU's fast paths: w8a8 linear layers and the decode attention, against the plain ones.

Both change how numbers are computed, never what the model means: w8a8 rows are
checked to be independent of their batch (bit for bit) and close to float; the
decode attention is checked to equal transformers' ``sdpa`` on padded and
unpadded batches.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from api.engine.errors import ModelLoadError
from api.engine.loader import load_model_bundle
from api.settings import ModelSettings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 80), (1536, 2048)])
def test_w8a8_rows_do_not_depend_on_their_batch(dtype, shape):
    """A request's numbers must not change with what it is batched with: one row with
    values 100x larger (another request's outlier token) leaves the others bit-identical.
    The activations' range is the one the loader picks on this CPU (7-bit without VNNI, where
    fbgemm's AVX2 kernel would saturate 8-bit products)."""
    from api.engine.loader import cpu_flags
    from api.engine.quantize import VNNI_FLAGS, W8A8Linear

    torch.manual_seed(0)
    features, outputs = shape
    linear = torch.nn.Linear(features, outputs, bias=True)
    reduce_range = not any(flag in cpu_flags() for flag in VNNI_FLAGS)
    quantized = W8A8Linear.from_linear(linear, reduce_range=reduce_range)
    x = torch.randn(7, features)
    x[2] *= 100.0
    x[3] = x[3].abs()          # all positive: its own min/max grid would differ
    x[5] = 0.0                 # an all-zero row must not divide by zero
    x = x.to(dtype)
    with torch.inference_mode():
        batched = quantized(x)
        alone = torch.cat([quantized(x[i:i + 1]) for i in range(len(x))])
        in_3d = quantized(x.reshape(1, 7, features)).reshape(7, outputs)
        reference = linear(x.float())
    assert batched.dtype == dtype and batched.shape == (7, outputs)
    assert torch.equal(batched, alone) and torch.equal(batched, in_3d)
    assert torch.isfinite(batched.float()).all()
    error = (batched.float() - reference).norm(dim=1) / reference.norm(dim=1)
    assert error.max().item() < 0.03, error


def test_w8a8_uses_7_bit_activations_only_without_vnni():
    from api.engine.quantize import W8A8Linear, quantize_w8a8

    def layers(flags):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4)))
        assert len(quantize_w8a8(model, flags)) == 2
        found = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        assert len(found) == 2 and not any(type(m) is torch.nn.Linear for m in model.modules())
        return {m.reduce_range for m in found}

    assert layers(["avx2", "avx512_vnni"]) == {False}
    assert layers(["avx2", "avx_vnni"]) == {False}
    assert layers(["avx2"]) == {True}


def test_w8a8_through_the_loader_barely_moves_the_predictions(demo_checkpoint):
    from api.engine.quantize import W8A8Linear
    from bench.quant_quality import kl_table

    base, lora = demo_checkpoint
    bundle = load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu",
                                             dtype="float32", quantization="w8a8", require_model=True))
    assert not any(type(m) is torch.nn.Linear for m in bundle.model.modules())
    assert sum(isinstance(m, W8A8Linear) for m in bundle.model.modules()) > 0
    assert bundle.quantization == "w8a8"
    assert bundle.quantization_reason.startswith("w8a8: ") and "per-token int8 activations" in \
        bundle.quantization_reason
    table = kl_table(str(base), str(lora), "float32", max_tokens=300, quantizations=("int8", "w8a8"))
    for row in table.values():
        assert row["tokens"] == 300
        assert row["kl_mean"] < 0.02 and row["top1_agreement"] > 0.85, table
    # activations rounded too: w8a8 moves more than weight-only int8, and the table says so
    assert table["w8a8"]["kl_mean"] >= table["int8"]["kl_mean"], table


@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_cpu_quantization_needs_a_merged_adapter(demo_checkpoint, quantization):
    base, lora = demo_checkpoint
    with pytest.raises(ModelLoadError, match=f"THAI_QUANTIZATION={quantization} .*THAI_MERGE_LORA=true"):
        load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu",
                                        quantization=quantization, merge_lora=False,
                                        require_model=True))


def test_w8a8_engine_generates_and_reports_it(demo_checkpoint):
    """The whole engine on w8a8: batched greedy requests finish with their token counts,
    and the info /health shows names the setting."""
    from api.engine import GenerationRequest, SamplingParams
    from api.engine.transformers_engine import TransformersEngine

    base, lora = demo_checkpoint

    async def run():
        engine = TransformersEngine(
            ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu", dtype="bfloat16",
                          quantization="w8a8", require_model=True))
        await engine.start()
        await engine.wait_ready()
        try:
            assert engine.info.quantization == "w8a8" and engine.info.dtype == "bfloat16"

            async def one(text: str, n: int):
                prompt = engine.encode_chat([{"role": "user", "content": text}])
                request = GenerationRequest(prompt, SamplingParams(
                    max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True))
                return [c async for c in engine.generate(request)]

            results = await asyncio.gather(*(one("สวัสดี " * (i + 1), 6 + i) for i in range(4)))
            for i, chunks in enumerate(results):
                assert chunks[-1].finished and chunks[-1].completion_tokens == 6 + i
        finally:
            await engine.stop()

    asyncio.run(run())


def test_auto_quantization_measures_w8a8_and_keeps_it_only_within_the_limit(demo_checkpoint):
    """THAI_QUANTIZATION=auto on the CPU: the probe's KL decides; above the limit the
    original layers come back, and the model computes exactly what an unquantized one does."""
    from api.engine.quantize import PROBE_TOKENS, W8A8Linear

    base, lora = demo_checkpoint

    def load(**extra):
        return load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu",
                                               dtype="float32", require_model=True, **extra))

    assert ModelSettings().quantization == "auto"
    lenient = load(quantization_max_kl=10.0)
    assert lenient.quantization == "w8a8"
    assert lenient.quantization_reason.startswith("w8a8 chosen by THAI_QUANTIZATION=auto: KL ")
    assert f"on {PROBE_TOKENS} Thai tokens (limit THAI_QUANTIZATION_MAX_KL=10)" in \
        lenient.quantization_reason
    assert any(isinstance(m, W8A8Linear) for m in lenient.model.modules())

    strict = load(quantization_max_kl=1e-9)
    assert strict.quantization == "none"
    assert "measured w8a8 at KL " in strict.quantization_reason
    assert "above THAI_QUANTIZATION_MAX_KL=1e-09" in strict.quantization_reason
    assert not any(isinstance(m, W8A8Linear) for m in strict.model.modules())
    plain = load(quantization="none")
    ids = torch.tensor([strict.tokenizer("ข่าวเศรษฐกิจไทยวันนี้")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(strict.model(ids).logits, plain.model(ids).logits)
        assert not torch.equal(lenient.model(ids).logits, plain.model(ids).logits)

    never = load(quantization_max_kl=0)
    assert never.quantization == "none" and "MAX_KL=0" in never.quantization_reason
    unmerged = load(merge_lora=False)
    assert unmerged.quantization == "none" and "THAI_MERGE_LORA=true" in unmerged.quantization_reason


def test_the_model_loads_in_a_thread_that_ends(demo_checkpoint, monkeypatch):
    """Loading runs torch's parallel ops; a pooled thread that ran them would keep an idle
    OpenMP team alive and make libgomp throttle the scheduler's (see ``in_own_thread``)."""
    import threading

    from api.engine import transformers_engine

    base, lora = demo_checkpoint
    seen: list[threading.Thread] = []

    def recording_load(settings):
        seen.append(threading.current_thread())
        return load_model_bundle(settings)

    monkeypatch.setattr(transformers_engine, "load_model_bundle", recording_load)

    async def run():
        engine = transformers_engine.TransformersEngine(ModelSettings(
            base_model=str(base), lora_path=str(lora), device="cpu", dtype="float32",
            quantization="none", require_model=True))
        await engine.start()
        await engine.wait_ready()
        try:
            assert len(seen) == 1 and seen[0].name == "model-load"
            seen[0].join(timeout=10)
            assert not seen[0].is_alive()
        finally:
            await engine.stop()

    asyncio.run(run())

    async def failing():
        def boom():
            raise ValueError("no weights here")
        with pytest.raises(ValueError, match="no weights here"):
            await transformers_engine.in_own_thread(boom)

    asyncio.run(failing())


def test_quantization_max_kl_is_bounded():
    from pydantic import ValidationError

    for bad in (-0.1, 11):
        with pytest.raises(ValidationError):
            ModelSettings(quantization_max_kl=bad)


def _decode_logits(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, use_cache=True)
        step_mask = None if mask is None else torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
        nxt = out.logits[:, -1:].argmax(-1)
        return model(nxt, attention_mask=step_mask, past_key_values=out.past_key_values,
                     use_cache=True).logits.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_decode_attention_equals_sdpa(demo_checkpoint, dtype):
    from api.engine.attention import ATTENTION_NAME

    base, lora = demo_checkpoint
    bundle = load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu",
                                             dtype=dtype, require_model=True))
    model = bundle.model
    assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped: the case
    torch.manual_seed(1)
    ids = torch.randint(10, 2000, (3, 17))
    padded = torch.ones(3, 17, dtype=torch.long)
    padded[0, :6] = 0
    ours = [_decode_logits(model, ids, padded), _decode_logits(model, ids[1:2], None)]
    model.set_attn_implementation("sdpa")
    try:
        theirs = [_decode_logits(model, ids, padded), _decode_logits(model, ids[1:2], None)]
    finally:
        model.set_attn_implementation(ATTENTION_NAME)
    tolerance = 1e-4 if dtype == "float32" else 0.05
    for a, b in zip(ours, theirs):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= tolerance * scale


def test_decode_attention_leaves_other_implementations_alone(demo_checkpoint):
    from transformers import AutoModelForCausalLM

    from api.engine.attention import use_cpu_decode_attention

    base, _ = demo_checkpoint
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    assert use_cpu_decode_attention(model) is False
    assert model.config._attn_implementation == "eager"
