"""int8 linear layers for the CPU: ``THAI_QUANTIZATION=int8`` (weight-only) and ``w8a8``.

On a CPU, decoding one token reads every weight once, so its speed is the
memory bandwidth divided by the weights' bytes: int8 weights halve what bf16
reads. Each ``nn.Linear`` of the merged model (adapter already folded in) is
replaced by :class:`Int8Linear`: symmetric per-output-channel int8 weights
(``scale = max|w| / 127``) and torch's packed CPU kernel
``aten._weight_int8pack_mm``, which multiplies activations in the model's dtype
by the int8 weights and scales in one pass (no bitsandbytes, no extra
package). Measured on the 1.5B shape, 2 cores: decode 4.3 -> 8.6 tok/s against
bf16 (``bench/RESULTS.md``).

That kernel is made for few rows; a long prompt's prefill (hundreds of rows)
runs faster as an ordinary bf16 matrix product over weights dequantized on the
fly, so rows above :data:`DEQUANTIZE_ROWS` take that path. The weights are
still stored once, in int8.

``w8a8`` (:class:`W8A8Linear`) also quantizes the activations, per token, at run
time, and multiplies int8 by int8 with fbgemm's kernel (AVX512-VNNI / AVX-VNNI
``vpdpbusd``: twice bf16's multiply rate, a quarter of float32's bytes). It is
faster than both ``int8`` and bf16 for decode *and* prefill, at a larger
quality cost (each token's activations rounded to 8 bits); ``bench.quant_quality``
measures both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

DEQUANTIZE_ROWS = 16


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "Int8Linear":
        weight = linear.weight.detach()
        scales = weight.abs().amax(dim=1).float().clamp(min=1e-8) / 127.0
        q = torch.empty(weight.shape, dtype=torch.int8)
        for rows in _row_chunks(weight.shape[0]):  # no float32 copy of a whole (vocabulary) matrix
            q[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp(-127, 127)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q, scales.to(dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if rows.shape[0] > DEQUANTIZE_ROWS:
            weight = self.weight.to(self.scales.dtype) * self.scales[:, None]
            out = torch.nn.functional.linear(rows, weight)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations (per token, dynamic).

    fbgemm's dynamic linear (``quantized::linear_dynamic``) picks one activation
    scale and zero point for its whole input, from the input's min and max. Used
    as is on a batch, one row with large values (another request's token, or a
    prompt's first token) would coarsen every other row's rounding, and a
    request's output would depend on what it was batched with. So each row is
    divided by its own largest magnitude (its values then lie in [-1, 1]; a linear
    map commutes with that, the output row is multiplied back and the bias added
    after), and one constant row holding +1 and -1 is appended, which pins the
    input's range to exactly [-1, 1]: every row is then rounded with the same
    8-bit grid, alone or in any batch, and the integer products are exact, so a
    row's output does not depend on its neighbours (``tests/test_cpu_fast_paths.py``).
    The model as a whole is not bit-stable across batches even so: attention over
    padded rows sums in another order, and rounding to 8 bits can turn such a last-bit
    difference into a whole step.

    ``reduce_range`` is fbgemm's 7-bit activation mode, needed only on CPUs
    without VNNI, whose ``vpmaddubsw`` saturates 16-bit sums.
    """

    def __init__(self, packed, in_features: int, out_features: int,
                 bias: torch.Tensor | None, reduce_range: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._packed = packed
        self.register_buffer("bias", bias)
        range_row = torch.zeros(in_features)
        range_row[0], range_row[1] = 1.0, -1.0
        self.register_buffer("range_row", range_row, persistent=False)
        self.reduce_range = reduce_range

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, reduce_range: bool) -> "W8A8Linear":
        weight = linear.weight.detach()
        scales = (weight.abs().amax(dim=1).float().clamp(min=1e-8) / 127.0).double()
        q = torch.empty(weight.shape, dtype=torch.int8)
        with warnings.catch_warnings():  # torch flags quantized-tensor creation as deprecated
            warnings.simplefilter("ignore")
            for rows in _row_chunks(weight.shape[0]):  # no float32 copy of a whole matrix
                q[rows] = torch.quantize_per_channel(
                    weight[rows].float(), scales[rows], torch.zeros(len(scales[rows]), dtype=torch.long),
                    0, torch.qint8).int_repr()
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls.from_int8(q, scales, bias, reduce_range)

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  reduce_range: bool) -> "W8A8Linear":
        """From int8 weights [out, in] and their float64 per-row scales (as :meth:`int8_weight`
        gives them back): the same packed weights, hence the same outputs, as the layer they
        came from. Packing is fbgemm's reorder for its kernel, done on one core."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                weight, scales.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        return cls(packed, weight.shape[1], weight.shape[0], bias, reduce_range)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weights [out, in] and float64 per-row scales, unpacked from fbgemm's form."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        pinned = torch.empty(rows.shape[0] + 1, self.in_features)
        peak = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True,
                                        dtype=torch.float32).clamp_(min=1e-12)
        torch.div(rows, peak, out=pinned[:-1])
        pinned[-1] = self.range_row
        out = torch.ops.quantized.linear_dynamic(pinned, self._packed, self.reduce_range)[:-1]
        out.mul_(peak)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                "int8 weights and per-token int8 activations")


class Int4Linear(nn.Module):
    """4-bit weights in groups of :data:`INT4_GROUP` along the input (asymmetric: a bf16 scale
    and zero point per group, as torchao's int4 weight-only) with torch's own CPU kernel
    ``aten._weight_int4pack_mm_for_cpu`` (prefill too: the packed layout is the kernel's
    own, so there is no cheap dequantized copy): a quarter of bf16's bytes per token."""

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int, group: int):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, weight.shape[0], group
        self.register_buffer("weight", weight)                    # packed by torch, uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / group, out, 2] bf16
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group: int = 0) -> "Int4Linear":
        group = group or INT4_GROUP
        out_f, in_f = linear.weight.shape
        q = torch.empty(out_f, in_f, dtype=torch.int32)
        scales = torch.empty(out_f, in_f // group, 1)
        zeros = torch.empty(out_f, in_f // group, 1)
        for rows in _row_chunks(out_f):
            w = linear.weight[rows].float().reshape(-1, in_f // group, group)
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = (high - low).clamp(min=1e-6) / 15
            q[rows] = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(-1, in_f)
            scales[rows], zeros[rows] = scale, low + scale * 8
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        del q
        scales_and_zeros = torch.cat([scales, zeros], 2).transpose(0, 1).contiguous().to(
            torch.bfloat16)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(packed, scales_and_zeros, bias, in_f, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group,
                                                         self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weights in groups of {self.group}")


INT4_GROUP = 64


def int4_supported() -> str | None:
    """Why ``int4`` cannot run here, or None: it needs torch's CPU int4 kernels."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"THAI_QUANTIZATION=int4 needs torch's CPU int4 kernels (torch {torch.__version__} lacks them)"
    return None


def quantize_int4(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` whose shape the kernel takes (input a multiple of the
    group, output of 16) with :class:`Int4Linear`, freeing each original as it goes;
    returns how many (the others stay as they are)."""
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and child.in_features % INT4_GROUP == 0
             and child.out_features % 16 == 0]  # the kernel's blocks
    for parent, name, child in found:
        setattr(parent, name, Int4Linear.from_linear(child))
    return len(found)


def own_tensors(model: nn.Module) -> None:
    """Copy the parameters left unquantized (embedding, norms) into memory of their own.

    transformers maps the checkpoint file and its parameters are views of that mapping: as
    long as one (the embedding) lives, every page read stays mapped and counted as resident,
    the whole full-precision checkpoint beside the quantized layers. Copied, the mapping is
    released with the last view."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(param.detach().clone(),
                                                        requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(
            getattr(model, "lm_head", None), nn.Linear):
        model.tie_weights()


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def w8a8_supported() -> str | None:
    """Why ``w8a8`` cannot run here, or None: it needs torch's fbgemm engine (x86)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return ("THAI_QUANTIZATION=w8a8 needs torch's fbgemm int8 kernels (an x86 CPU build); "
                f"this build has {', '.join(torch.backends.quantized.supported_engines)}")
    return None


def quantize_int8(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` (``lm_head`` too) in place; returns how many."""
    return len(_replace_linears(model, lambda linear: Int8Linear.from_linear(linear, dtype)))


def quantize_w8a8(model: nn.Module, cpu_flags: Collection[str],
                  keep_originals: bool = True) -> list[tuple[nn.Module, str, nn.Linear | None]]:
    """Replace every ``nn.Linear`` (``lm_head`` too) with :class:`W8A8Linear`; returns
    (parent, name, original) for each, which :func:`restore_linears` puts back. Without
    ``keep_originals`` each original is let go as soon as it is converted (original None),
    so the full-precision and the int8 model are never in memory together."""
    reduce_range = w8a8_reduce_range(cpu_flags)
    return _replace_linears(model, lambda linear: W8A8Linear.from_linear(linear, reduce_range),
                            keep_originals)


def w8a8_reduce_range(cpu_flags: Collection[str]) -> bool:
    """fbgemm's 7-bit activations, for CPUs without VNNI (see :class:`W8A8Linear`)."""
    return not any(flag in cpu_flags for flag in VNNI_FLAGS)


def restore_linears(replaced: list[tuple[nn.Module, str, nn.Linear | None]]) -> None:
    for parent, name, original in replaced:
        setattr(parent, name, original)


def _replace_linears(model: nn.Module, convert,
                     keep_originals: bool = True) -> list[tuple[nn.Module, str, nn.Linear | None]]:
    """Convert every ``nn.Linear`` under ``model``, several at once: fbgemm's packing runs on
    one core, so a thread per core (the GIL is released inside torch) divides the time. Each
    layer is swapped in as soon as it is converted; without ``keep_originals`` nothing else
    holds the original, so its weights are freed then (peak memory: the model plus a few
    layers, not the model twice)."""
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    places = [(parent, name) for parent, name, _ in found]

    def swap(item: tuple[nn.Module, str, nn.Linear]) -> nn.Linear | None:
        parent, name, linear = item
        setattr(parent, name, convert(linear))
        return linear if keep_originals else None

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        results = pool.map(swap, found)
        del found  # the pool's pending work holds each original until it is converted
        originals = list(results)
    return [(parent, name, original) for (parent, name), original in zip(places, originals)]


def _row_chunks(rows: int, chunk: int = 4096):
    for start in range(0, rows, chunk):
        yield slice(start, start + chunk)


# ------------------------------------------------------------------ THAI_QUANTIZATION=auto

PROBE_TEXT = Path(__file__).resolve().parents[2] / "assets" / "examples" / "news.txt"
PROBE_TOKENS = 256


def next_token_logprobs(model: nn.Module, ids: list[int], window: int = 256) -> torch.Tensor:
    """log-softmax of the model's next-token logits at every position of ``ids``, in float32."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start:start + window]], device=model.device)
            out.append(torch.log_softmax(model(chunk).logits[0].float(), dim=-1))
    return torch.cat(out)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position, in nats, from two log-probability tensors."""
    return (reference.exp() * (reference - other)).sum(-1)


def probe_ids(tokenizer) -> list[int]:
    """The first :data:`PROBE_TOKENS` tokens of the bundled Thai news text ([] if missing)."""
    try:
        text = PROBE_TEXT.read_text(encoding="utf-8")
    except OSError:
        return []
    return tokenizer(text)["input_ids"][:PROBE_TOKENS]


def choose_cpu_quantization(model: nn.Module, ids: list[int], max_kl: float,
                            cpu_flags: Collection[str],
                            reload: Callable[[], nn.Module] | None = None) -> tuple[str, str]:
    """``THAI_QUANTIZATION=auto`` on a CPU: ``w8a8`` (the fastest setting, ``bench/RESULTS.md``)
    if, on *these* weights, it moves the next-token distribution of a bundled Thai text by
    at most ``max_kl`` nats per token on average; otherwise the weights stay as they are.
    Returns (what runs: w8a8 or none, why), as :func:`~api.engine.loader.apply_quantization`.

    Measured at start-up rather than assumed: a trained model's activations can have
    outlier channels that per-token int8 rounds badly, which random or other weights
    would not show. Costs two forward passes over :data:`PROBE_TOKENS` tokens.

    With ``reload`` (a function loading the same unquantized model again), each original
    layer is freed as soon as it is converted, so the unquantized and the quantized weights
    are never in memory together; if w8a8 is then refused, the layers are taken from a
    reloaded copy. Without it, the originals are kept until the verdict.
    """
    if max_kl <= 0:
        return "none", "none: THAI_QUANTIZATION_MAX_KL=0 (auto never quantizes)"
    if (problem := w8a8_supported()) is not None:
        return "none", f"none: {problem}"
    if not ids:
        return "none", (f"none: the probe text {PROBE_TEXT.name} is missing, so w8a8's quality "
                        "cost cannot be checked")
    reference = next_token_logprobs(model, ids)
    paths = {id(module): name for name, module in model.named_modules()}
    replaced = quantize_w8a8(model, cpu_flags, keep_originals=reload is None)
    kl = kl_divergence(reference, next_token_logprobs(model, ids)).mean().item()
    measured = f"KL {kl:.4f} nats/token against the unquantized weights on {len(ids)} Thai tokens"
    if kl <= max_kl:
        return "w8a8", (f"w8a8 chosen by THAI_QUANTIZATION=auto: {measured} "
                        f"(limit THAI_QUANTIZATION_MAX_KL={max_kl:g})")
    if reload is not None:
        fresh = reload()
        replaced = [(parent, name, fresh.get_submodule(f"{paths[id(parent)]}.{name}".lstrip(".")))
                    for parent, name, _ in replaced]
        del fresh
    restore_linears(replaced)
    if reload is not None and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the output projection shares this model's embedding again
    return "none", (f"none: THAI_QUANTIZATION=auto measured w8a8 at {measured}, "
                    f"above THAI_QUANTIZATION_MAX_KL={max_kl:g}")
