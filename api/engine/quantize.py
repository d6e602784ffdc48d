"""Weight-only int8 for the CPU (``THAI_QUANTIZATION=int8``), with torch's own kernel.

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
"""

from __future__ import annotations

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
        q = torch.round(weight.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(q.contiguous(), scales.to(dtype), bias)

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


def quantize_int8(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` (``lm_head`` too) in place; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child, dtype))
            count += 1
        else:
            count += quantize_int8(child, dtype)
    return count
