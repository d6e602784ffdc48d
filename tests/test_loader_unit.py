"""Loader checks that turn the seed's troubleshooting cases into clear errors, fast."""

from __future__ import annotations

import pytest

from api.engine.errors import ModelLoadError
from api.engine.loader import hub_reachable, load_model_bundle, locate_model, missing_adapter_message
from api.settings import ModelSettings
from tests.support import free_port


@pytest.mark.timeout(60)  # a hang guard (no retry loop), not a speed test
def test_unreachable_hub_is_detected_in_seconds(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    assert hub_reachable(3.0) is False


def test_production_mode_names_every_problem(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = ModelSettings(base_model="Qwen/Qwen2.5-1.5B-Instruct", lora_path=str(tmp_path / "lora"),
                             require_model=True)
    with pytest.raises(ModelLoadError) as info:
        locate_model(settings)
    message = str(info.value)
    assert f"Thai model not found at {tmp_path / 'lora'}" in message
    assert "cannot be reached" in message


def test_incomplete_adapter_folder_lists_what_is_missing(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    message = missing_adapter_message(str(tmp_path))
    assert message and "adapter_model.safetensors" in message
    assert missing_adapter_message(str(tmp_path / "absent")).startswith("Thai model not found at")


@pytest.mark.parametrize("overrides, needle", [
    ({"quantization": "8bit", "device": "cpu"}, "THAI_QUANTIZATION=8bit needs a CUDA GPU"),
    ({"device": "cuda"}, "THAI_DEVICE=cuda but no CUDA device"),
])
def test_gpu_only_options_fail_clearly_on_cpu(overrides, needle, demo_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, lora = demo_checkpoint
    with pytest.raises(ModelLoadError) as info:
        load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), **overrides))
    assert needle in str(info.value)


AVX512_BF16_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 amx_tile\n"
PLAIN_CPU = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"


def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16():
    import torch

    from api.engine.loader import cpu_bf16_flags, resolve_dtype

    assert cpu_bf16_flags(AVX512_BF16_CPU) == ["avx512_bf16"]
    assert cpu_bf16_flags(PLAIN_CPU) == [] and cpu_bf16_flags("") == []
    dtype, reason = resolve_dtype("auto", "cpu", cpuinfo=PLAIN_CPU)
    assert dtype is torch.float32 and "no native bf16" in reason
    dtype, reason = resolve_dtype("auto", "cpu", cpuinfo=AVX512_BF16_CPU)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # torch's oneDNN has bf16 kernels here
        assert dtype is torch.bfloat16 and "avx512_bf16" in reason
    else:
        assert dtype is torch.float32
    dtype, reason = resolve_dtype("float32", "cpu", cpuinfo=AVX512_BF16_CPU)
    assert dtype is torch.float32 and reason == "float32: set by THAI_DTYPE"


def test_auto_dtype_and_threads_load_the_model_and_say_why(demo_checkpoint):
    """The small-shape model through the real loader and engine with dtype auto."""
    import asyncio

    from api.engine import GenerationRequest, SamplingParams
    from api.engine.loader import resolve_dtype
    from api.engine.transformers_engine import TransformersEngine

    base, lora = demo_checkpoint
    expected, reason = resolve_dtype("auto", "cpu")
    settings = ModelSettings(base_model=str(base), lora_path=str(lora), require_model=True,
                             device="cpu", dtype="auto", num_threads=1)

    async def run():
        engine = TransformersEngine(settings)
        await engine.start()
        await engine.wait_ready()
        try:
            assert engine.info.dtype == str(expected).replace("torch.", "")
            assert engine.info.dtype_reason == reason
            prompt = engine.encode_chat([{"role": "user", "content": "สวัสดี"}])
            request = GenerationRequest(prompt, SamplingParams(
                max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True))
            chunks = [c async for c in engine.generate(request)]
            assert chunks[-1].finished and chunks[-1].completion_tokens == 4
        finally:
            await engine.stop()

    asyncio.run(run())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_weights_on_the_cpu_barely_move_the_predictions(demo_checkpoint, dtype):
    """The small-shape checkpoint through the real loader with THAI_QUANTIZATION=int8."""
    import torch

    from api.engine.quantize import Int8Linear
    from bench.quant_quality import kl_stats

    base, lora = demo_checkpoint
    bundle = load_model_bundle(ModelSettings(base_model=str(base), lora_path=str(lora), device="cpu",
                                             dtype=dtype, quantization="int8", require_model=True))
    linears = [m for m in bundle.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and any(isinstance(m, Int8Linear) for m in bundle.model.modules())
    assert bundle.quantization == "int8" and "int8 weights" in bundle.quantization_reason
    stats = kl_stats(str(base), str(lora), dtype, max_tokens=300)
    assert stats["kl_mean"] < 0.01 and stats["top1_agreement"] > 0.9, stats


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_int8_linear_decode_and_prefill_paths_agree(dtype_name):
    import torch

    from api.engine.quantize import DEQUANTIZE_ROWS, Int8Linear

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    linear = torch.nn.Linear(64, 48, bias=True).to(dtype)
    quantized = Int8Linear.from_linear(linear, dtype)
    x = torch.randn(2, DEQUANTIZE_ROWS + 5, 64, dtype=dtype)
    with torch.inference_mode():
        reference = linear(x).float()
        prefill = quantized(x).float()  # more rows than DEQUANTIZE_ROWS: dequantized matmul
        decode = torch.cat([quantized(x[:, i:i + 1]) for i in range(x.shape[1])], 1).float()
    assert prefill.shape == reference.shape == decode.shape
    scale = reference.abs().max().item()
    assert (prefill - reference).abs().max().item() < 0.05 * scale
    assert (decode - prefill).abs().max().item() < 0.02 * scale
