"""Find and load the model: base weights, LoRA adapter, tokenizer.

The same function loads Qwen2.5-1.5B-Instruct on an H100 and the generated
demo checkpoint on a laptop; only the paths differ. Problems the original design's
troubleshooting section lists (missing adapter, no GPU, hub unreachable) are
turned into one clear message here, before anything heavy is loaded.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from api.engine.errors import ModelLoadError
from api.settings import ModelSettings

log = logging.getLogger("thai.engine.loader")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ModelSource:
    base_model: str
    adapter: str | None
    demo: bool = False
    reason: str | None = None


@dataclass
class ModelBundle:
    model: Any
    tokenizer: Any
    device: str
    dtype: str
    dtype_reason: str
    source: ModelSource
    eos_token_ids: tuple[int, ...]
    max_context: int
    quantization: str = "none"       # what runs (auto resolved)
    quantization_reason: str = "none: set by THAI_QUANTIZATION"
    # Adapters served unmerged (THAI_LORA_MODULES / THAI_ENABLE_LORA): the wrapped layers,
    # and each start-up adapter's slot by its model name (the default one's under the
    # served name). None: the one adapter, if any, is merged (or peft's, unmerged).
    lora: Any = None                  # api.engine.lora.LoraSet
    lora_slots: dict[str, int] | None = None


def multi_lora(settings: ModelSettings) -> bool:
    """Whether adapters are served unmerged, per request row."""
    return settings.enable_lora or bool(settings.lora_modules)


def base_model_name(settings: ModelSettings, base_model: str) -> str:
    """The model name that picks the base without adapter (THAI_BASE_MODEL_NAME)."""
    return settings.base_model_name or Path(base_model.rstrip("/")).name or base_model


def lora_modules(settings: ModelSettings) -> list[tuple[str, str]]:
    """THAI_LORA_MODULES as (name, folder) pairs (the setting has checked their form)."""
    pairs = []
    for item in settings.lora_modules:
        name, _, path = item.partition("=")
        pairs.append((name.strip(), path.strip()))
    return pairs


def missing_adapter_message(lora_path: str) -> str | None:
    """The original design's message when the adapter folder is missing or incomplete, else None."""
    path = Path(lora_path)
    if not path.is_dir():
        return (f"Thai model not found at {lora_path}: expected a folder with "
                f"{', '.join(ADAPTER_FILES)} (and tokenizer files); train the adapter or set THAI_LORA_PATH")
    has_weights = (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists()
    missing = [name for name in ADAPTER_FILES if not (path / name).exists()]
    if not (path / "adapter_config.json").exists() or not has_weights:
        return (f"Thai model not found at {lora_path}: the folder lacks {', '.join(missing)} "
                f"(expected {', '.join(ADAPTER_FILES)})")
    return None


def hub_reachable(timeout_s: float) -> bool:
    """A TCP connect to the hub, bounded by ``timeout_s``: no minutes of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def base_model_cached(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # invalid repo id and the like
        return False
    return isinstance(found, str)


def locate_model(settings: ModelSettings) -> ModelSource:
    """Decide what to load, falling back to the demo checkpoint in development."""
    problems: list[str] = []
    adapter = settings.lora_path or None
    if adapter:
        msg = missing_adapter_message(adapter)
        if msg:
            problems.append(msg)
    base = settings.base_model
    if not Path(base).is_dir() and not base_model_cached(base):
        if not hub_reachable(settings.hub_timeout_s):
            problems.append(
                f"base model {base!r} is not on disk or in the Hugging Face cache, and the hub "
                f"cannot be reached (checked in {settings.hub_timeout_s:g}s)"
            )
    if not problems:
        return ModelSource(base_model=base, adapter=adapter)
    reason = "; ".join(problems)
    if settings.require_model:
        raise ModelLoadError(reason)
    from api.engine.demo_checkpoint import ensure_demo_checkpoint

    log.warning("=" * 72)
    log.warning("%s", reason)
    log.warning("FALLING BACK TO THE DEMO CHECKPOINT at %s: random weights, output is NOT "
                "meaningful. Set THAI_REQUIRE_MODEL=true to exit instead.", settings.demo_dir)
    log.warning("=" * 72)
    base_dir, lora_dir = ensure_demo_checkpoint(settings.demo_dir)
    return ModelSource(base_model=str(base_dir), adapter=str(lora_dir), demo=True, reason=reason)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("THAI_DEVICE=cuda but no CUDA device is visible to torch "
                             "(install the CUDA build of torch, or use THAI_DEVICE=cpu)")
    return requested


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bfloat16 instruction sets this CPU reports."""
    flags = cpu_flags(cpuinfo)
    return [f for f in CPU_BF16_FLAGS if f in flags]


def resolve_dtype(requested: str, device: str, cpuinfo: str | None = None):
    """The weights' dtype and why it was chosen (shown in /health and the UI banner).

    On a CPU, ``auto`` is bfloat16 only where the CPU computes it natively (AVX512-BF16
    or AMX) and torch's oneDNN has bf16 kernels: there it halves the bytes read per
    token and runs the matrix products in bf16 (measured on a 2-core AVX512-BF16 box
    with the 1.5B shape: decode 2.3 -> 3.5 tok/s, prefill of 785 tokens 15.7 -> 4.3 s).
    Elsewhere bf16 is emulated and slower than float32, so float32 stays.
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested), f"{requested}: set by THAI_DTYPE"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bfloat16: the GPU supports it"
        return torch.float16, "float16: the GPU has no bfloat16"
    flags = cpu_bf16_flags(cpuinfo)
    mkldnn_bf16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    if flags and mkldnn_bf16:
        return torch.bfloat16, f"bfloat16: this CPU has native bf16 ({', '.join(flags)})"
    return torch.float32, "float32: this CPU has no native bf16 (AVX512-BF16 or AMX)"


def apply_quantization(model, settings: ModelSettings, device: str, dtype, tokenizer,
                       source: ModelSource) -> tuple[str, str]:
    """Quantize the loaded (merged) model in place as THAI_QUANTIZATION says; returns
    (what runs, why). bitsandbytes (8bit/4bit) was applied while loading."""
    requested = settings.quantization
    if requested in ("8bit", "4bit"):
        return requested, f"{requested}: bitsandbytes, set by THAI_QUANTIZATION"
    if requested == "none":
        return "none", "none: set by THAI_QUANTIZATION"
    from api.engine import quantize

    if requested == "int8":
        layers = quantize.quantize_int8(model, dtype)
        return "int8", f"int8: {layers} linear layers with int8 weights, set by THAI_QUANTIZATION"
    if requested == "w8a8":
        layers = len(quantize.quantize_w8a8(model, cpu_flags(), keep_originals=False))
        return "w8a8", (f"w8a8: {layers} linear layers with int8 weights and per-token int8 "
                        "activations, set by THAI_QUANTIZATION")
    if requested == "int4":
        layers = quantize.quantize_int4(model)
        return "int4", (f"int4: {layers} linear layers with 4-bit weights in groups of "
                        f"{quantize.INT4_GROUP}, set by THAI_QUANTIZATION")
    # auto
    if device != "cpu":
        return "none", "none: THAI_QUANTIZATION=auto quantizes on the CPU only"
    if source.adapter and not settings.merge_lora and not multi_lora(settings):
        return "none", "none: THAI_QUANTIZATION=auto needs the adapter merged (THAI_MERGE_LORA=true)"
    return quantize.choose_cpu_quantization(model, quantize.probe_ids(tokenizer),
                                            settings.quantization_max_kl, cpu_flags(),
                                            # per-row adapters wrap the layers: keep the originals
                                            reload=None if multi_lora(settings)
                                            else lambda: _load_merged(source, dtype))


def load_model_bundle(settings: ModelSettings) -> ModelBundle:
    """Load tokenizer, base model and adapter. Blocking: call it off the event loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device)
    bitsandbytes = settings.quantization in ("8bit", "4bit")
    cpu_int8 = settings.quantization in ("int8", "w8a8", "int4")
    if bitsandbytes and device != "cuda":
        raise ModelLoadError(f"THAI_QUANTIZATION={settings.quantization} needs a CUDA GPU "
                             "(bitsandbytes); on a CPU use THAI_QUANTIZATION=int8, w8a8 or none")
    if cpu_int8 and device != "cpu":
        raise ModelLoadError(f"THAI_QUANTIZATION={settings.quantization} is for the CPU; on a GPU "
                             "use 8bit or 4bit (bitsandbytes) or none")
    multi = multi_lora(settings)
    if cpu_int8 and settings.lora_path and not settings.merge_lora and not multi:
        raise ModelLoadError(f"THAI_QUANTIZATION={settings.quantization} quantizes the merged "
                             "model: it needs THAI_MERGE_LORA=true")
    if settings.quantization == "w8a8":
        from api.engine.quantize import w8a8_supported

        if (problem := w8a8_supported()) is not None:
            raise ModelLoadError(problem)
    if settings.quantization == "int4":
        from api.engine.quantize import int4_supported

        if (problem := int4_supported()) is not None:
            raise ModelLoadError(problem)
    dtype, dtype_reason = resolve_dtype(settings.dtype, device)
    log.info("weights dtype %s", dtype_reason)
    source = locate_model(settings)

    tok_dir = source.adapter if source.adapter and all(
        (Path(source.adapter) / f).exists() for f in TOKENIZER_FILES[:1]) else source.base_model
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # Several adapters wrap the base's layers per request row: the cache holds plain layers.
    quant_cache = None if multi else _quant_cache(settings, source, device, dtype)
    hit = quant_cache.load(source.base_model, dtype, cpu_flags()) if quant_cache else None
    if hit is not None and hit[0] is not None:
        model, quantization, quantization_reason = hit
        log.info("quantization %s", quantization_reason)
        return _bundle(model, tokenizer, device, dtype, dtype_reason, source, quantization,
                       quantization_reason)

    kwargs: dict[str, Any] = {"dtype": dtype}
    if bitsandbytes:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=settings.quantization == "8bit",
            load_in_4bit=settings.quantization == "4bit",
            llm_int8_threshold=6.0,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.base_model, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load base model {source.base_model!r}: {exc}") from exc
    if not bitsandbytes:
        model = model.to(device)
    if device == "cpu":
        from api.engine.attention import use_cpu_decode_attention

        use_cpu_decode_attention(model)
    lora = None
    if multi:
        from api.engine.lora import LoraSet

        lora = LoraSet.wrap(model, dtype, device)  # before quantization, which keeps the wrappers
    elif source.adapter:
        from peft import PeftModel

        with warnings.catch_warnings():
            # peft reads transformers' deprecated ``is_gradient_checkpointing`` alias while it
            # wraps the model (peft_model.py); the FutureWarning is about their code, not ours
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = PeftModel.from_pretrained(model, source.adapter)
        if settings.merge_lora and not bitsandbytes:
            model = model.merge_and_unload()
    model.eval()
    quantization, quantization_reason = hit[1:] if hit is not None else apply_quantization(
        model, settings, device, dtype, tokenizer, source)
    log.info("quantization %s", quantization_reason)
    if quantization in ("int8", "w8a8", "int4"):
        from api.engine.quantize import own_tensors

        own_tensors(model)
    if quant_cache is not None and hit is None:
        quant_cache.store(model, quantization, quantization_reason)
    lora_slots = load_start_adapters(lora, settings, source) if lora is not None else None

    eos: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif gen_eos:
        eos.update(gen_eos)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    config = model.config
    max_context = int(getattr(config, "max_position_embeddings", 0) or 4096)
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=str(dtype).replace("torch.", ""),
        dtype_reason=dtype_reason,
        quantization=quantization,
        quantization_reason=quantization_reason,
        source=source,
        eos_token_ids=tuple(sorted(eos)),
        max_context=max_context,
        lora=lora,
        lora_slots=lora_slots,
    )


def load_start_adapters(lora, settings: ModelSettings, source: ModelSource) -> dict[str, int]:
    """Read, check and install the default adapter (under the served name) and
    THAI_LORA_MODULES; any problem stops the start with one clear message."""
    from api.engine.errors import AdapterError

    base_name = base_model_name(settings, source.base_model)
    slots = {base_name: 0}
    wanted = ([(settings.served_model_name, source.adapter)] if source.adapter else []) + \
        lora_modules(settings)
    if not source.adapter:
        slots[settings.served_model_name] = 0
    for name, path in wanted:
        if name in slots and not (name == settings.served_model_name and source.adapter):
            raise ModelLoadError(f"adapter name {name!r} is already the served or base model's "
                                 "name (THAI_SERVED_MODEL_NAME, THAI_BASE_MODEL_NAME)")
        try:
            spec = lora.read(name, path, base_model=source.base_model,
                             max_rank=settings.max_lora_rank)
        except AdapterError as exc:
            raise ModelLoadError(str(exc)) from None
        slots[name] = lora.install(spec)
        log.info("LoRA adapter %s: rank %d on %d layers, served per request row", name,
                 spec.rank, len(spec.weights))
    return slots


def _quant_cache(settings: ModelSettings, source: ModelSource, device: str, dtype):
    """The quantized-weight cache entry for this start (THAI_QUANT_CACHE_DIR), or None."""
    from api.engine.quant_cache import QuantCache

    return QuantCache.for_settings(settings, source, device, dtype, cpu_flags())


def _bundle(model, tokenizer, device: str, dtype, dtype_reason: str, source: ModelSource,
            quantization: str, quantization_reason: str) -> ModelBundle:
    """A bundle around a model built from the quantized-weight cache: the same end state as
    :func:`load_model_bundle`'s own path (CPU decode attention, end-of-sequence ids)."""
    from api.engine.attention import use_cpu_decode_attention

    use_cpu_decode_attention(model)
    eos: set[int] = set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return ModelBundle(
        model=model, tokenizer=tokenizer, device=device, dtype=str(dtype).replace("torch.", ""),
        dtype_reason=dtype_reason, quantization=quantization,
        quantization_reason=quantization_reason, source=source,
        eos_token_ids=tuple(sorted(eos)),
        max_context=int(getattr(model.config, "max_position_embeddings", 0) or 4096))


def _load_merged(source: ModelSource, dtype):
    """The unquantized model on the CPU, adapter merged, loaded again: what
    ``THAI_QUANTIZATION=auto`` falls back to after freeing the layers it converted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.base_model, dtype=dtype)
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
    return model.eval()
