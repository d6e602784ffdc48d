"""Several LoRA adapters over one unmerged base, applied per batch row.

One adapter is merged into the base at load (``loader.py``): the fastest path, and
today's. With several (``THAI_LORA_MODULES``, ``THAI_ENABLE_LORA``), requests for
different adapters share one batch, so no adapter can be merged. Each linear layer of
the decoder is wrapped in :class:`LoraLinear`: the base GEMM runs once for the whole
batch, then the low-rank products ``x @ A^T @ (scaling * B)^T`` of every adapter in the
batch at once, each row keeping its own adapter's (the S-LoRA / punica way: base GEMM once,
low-rank products per adapter, here as one packed product with a row mask instead of a
custom kernel).

Adapters are peft LoRA folders read here without peft (``adapter_config.json`` and
``adapter_model.safetensors``; a pickle ``adapter_model.bin`` is refused: loading one
runs code). Everything an adapter could get wrong (rank, target modules, shapes, the
base it was trained on, features that cannot be applied per row: DoRA, biases,
``modules_to_save``) is checked before it serves anything.

The scheduler tells the wrappers which rows belong to which adapter before each
forward (:class:`RowGroups`, ``LoraSet.rows``); adapter weights are swapped in copy-on-write
dictionaries, so loading or unloading one never disturbs a forward in progress.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from api.engine.errors import AdapterError, ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# peft's key: base_model.model.<module>.lora_A.weight (the adapter's own name removed on save)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
NO_ADAPTER = 0  # the slot of rows that run the base alone


class LoraLinear(nn.Module):
    """A linear layer (``nn.Linear`` or a quantized one) plus per-row LoRA deltas.

    ``weights``: slot -> (A [r, in], scaling * B [out, r]); replaced, never mutated. Setting
    it also packs every adapter into one pair (``A_all`` [S * R, in], ``B_all`` [out, S * R],
    each adapter's rank zero-padded to the layer's largest R), so a batch that mixes adapters
    costs four operations per layer whatever it mixes: ``x @ A_all^T``, a 0/1 mask that keeps
    each row's own adapter's columns, ``@ B_all^T``, the add. On a small model the number of
    operations, not their arithmetic, is the cost (one index_select/index_add pair per
    adapter per layer was twice as slow). The packed tuple is replaced in one assignment, so
    a forward on the worker thread sees one consistent set.
    """

    def __init__(self, base: nn.Module, rows: "RowGroups"):
        super().__init__()
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self._rows = rows
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def weights(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self._weights

    @weights.setter
    def weights(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        packed = None
        if weights:
            slots = tuple(sorted(weights))
            rank = max(weights[s][0].shape[0] for s in slots)
            a0, b0 = weights[slots[0]]
            a_all = a0.new_zeros(len(slots) * rank, self.in_features)
            b_all = b0.new_zeros(self.out_features, len(slots) * rank)
            for i, slot in enumerate(slots):
                a, b = weights[slot]
                a_all[i * rank:i * rank + a.shape[0]] = a
                b_all[:, i * rank:i * rank + b.shape[1]] = b
            packed = ((slots, rank, a_all.dtype), a_all, b_all)
        self._weights, self._packed = weights, packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows, weights, packed = self._rows, self._weights, self._packed
        if not rows.active or not weights:
            return out
        if rows.only is not None:  # every row runs one adapter
            pair = weights.get(rows.only)
            if pair is None:
                return out
            a, b = pair
            x = x if x.dtype == a.dtype else x.to(a.dtype)
            return out + ((x @ a.t()) @ b.t()).to(out.dtype)
        key, a_all, b_all = packed
        mask = self._rows.mask(key, x.dim())
        if mask is None:  # no row of this batch runs an adapter this layer has
            return out
        x = x if x.dtype == a_all.dtype else x.to(a_all.dtype)
        return out + (((x @ a_all.t()) * mask) @ b_all.t()).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lora slots={sorted(self._weights)}"


class RowGroups:
    """Which batch rows run which adapter in the next forward: ``only`` when every row runs
    one adapter, else the rows' slots, from which each packing's column mask is built once
    per forward (layers with the same adapters and rank share it)."""

    def __init__(self) -> None:
        self.active = False             # some row runs an adapter
        self.only: int | None = None    # the adapter every row runs, if one does
        self._present: frozenset[int] = frozenset()
        self._slots: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def set(self, slots: list[int], device: torch.device) -> None:
        present = set(slots) - {NO_ADAPTER}
        self._masks = {}
        self.active = bool(present)
        self.only = next(iter(present)) if len(present) == 1 and NO_ADAPTER not in slots else None
        mixed = self.active and self.only is None
        self._present = frozenset(present)
        self._slots = torch.tensor(slots, dtype=torch.long, device=device) if mixed else None

    def mask(self, key: tuple, dims: int) -> torch.Tensor | None:
        """[rows, 1 ..., S * R]: 1 where a column belongs to the row's own adapter (key: a
        packed layer's (slots, rank, dtype)); None when no row runs any of those slots."""
        cache_key = (key, dims)
        if cache_key not in self._masks:
            slots, rank, dtype = key
            mask = None
            if self._present.intersection(slots):
                rows = self._slots
                columns = torch.tensor(slots, dtype=torch.long,
                                       device=rows.device).repeat_interleave(rank)
                mask = (rows[:, None] == columns[None, :]).to(dtype).reshape(
                    rows.shape[0], *[1] * (dims - 2), -1)
            self._masks[cache_key] = mask
        return self._masks[cache_key]


@dataclass
class AdapterSpec:
    """One adapter read from its folder, checked, not yet installed."""

    name: str
    path: str
    rank: int
    target_modules: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, scaling * B)


def decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of each linear layer an adapter may target: the
    decoder's (attention and MLP projections); never the embeddings or the LM head."""
    found = []
    for full, module in model.named_modules():
        for attr, child in module.named_children():
            name = f"{full}.{attr}" if full else attr
            if isinstance(child, nn.Linear) and ".layers." in f".{name}":
                found.append((module, attr, name))
    return found


def same_base(declared: str | None, adapter_dir: Path, base_model: str) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` names the loaded base: the same
    hub id or folder, or the same last path part (a hub id against its local copy)."""
    if not declared:
        return True  # nothing declared: the shapes decide
    if declared == base_model:
        return True
    candidates = [Path(declared)] if Path(declared).is_absolute() else [adapter_dir / declared,
                                                                           Path(declared)]
    base = Path(base_model)
    if base.is_dir():
        for candidate in candidates:
            try:
                if candidate.is_dir() and candidate.resolve() == base.resolve():
                    return True
            except OSError:
                pass
    return Path(declared.rstrip("/")).name == Path(base_model.rstrip("/")).name


def read_adapter(name: str, folder: str | Path, *, base_model: str, max_rank: int,
                 targets: dict[str, LoraLinear], dtype: torch.dtype,
                 device: torch.device | str) -> AdapterSpec:
    """Read and check a peft LoRA folder against the loaded base (raises AdapterError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {folder} is not a folder")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise AdapterError(f"adapter {name!r}: only safetensors weights are read, and the "
                               f"folder has {pickles[0]} (a pickle, which runs code when loaded); "
                               f"convert it to {WEIGHTS_FILE}")
        raise AdapterError(f"adapter {name!r}: the folder lacks {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type} is not LoRA")
    for flag, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                      ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if config.get(flag):
            raise AdapterError(f"adapter {name!r}: {why} cannot be applied per request here")
    if str(config.get("bias", "none")) != "none":
        raise AdapterError(f"adapter {name!r}: trained biases (bias={config['bias']!r}) cannot be "
                           "applied per request here")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} needs an integer r and lora_alpha")
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} is above THAI_MAX_LORA_RANK={max_rank}")
    declared = config.get("base_model_name_or_path")
    if not same_base(declared, path, base_model):
        raise AdapterError(f"adapter {name!r} was trained on {declared!r}, not on the loaded "
                           f"base {Path(base_model).name!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {exc}") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: weight {key[:200]!r} is not a LoRA A/B "
                               "matrix of a linear layer")
        parts.setdefault(match["module"], {})[match["ab"]] = tensor
    if not parts:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(parts.items()):
        target = targets.get(module)
        if target is None:
            raise AdapterError(f"adapter {name!r} targets {module!r}, which is not a linear layer "
                               "of the loaded base's decoder")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {module} lacks its lora_{'AB'[('A' in ab)]}")
        a, b = ab["A"], ab["B"]
        if (a.ndim != 2 or b.ndim != 2 or a.shape != (rank, target.in_features)
                or b.shape != (target.out_features, rank)):
            raise AdapterError(
                f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                f"loaded base needs A ({rank}, {target.in_features}) and B "
                f"({target.out_features}, {rank}) (another base, or another rank than r={rank})")
        weights[module] = (a.to(device=device, dtype=dtype).contiguous(),
                           (b.to(torch.float32) * scaling).to(device=device, dtype=dtype).contiguous())
    targets_declared = config.get("target_modules") or []
    if isinstance(targets_declared, str):
        targets_declared = [targets_declared]
    return AdapterSpec(name=name, path=str(path), rank=rank,
                       target_modules=tuple(sorted(str(t) for t in targets_declared)),
                       weights=weights)


class LoraSet:
    """The adapters installed in the wrapped model, by slot; names live in the engine."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: str):
        self.rows = RowGroups()
        self.dtype, self.device = dtype, torch.device(device)
        self.targets: dict[str, LoraLinear] = {}
        self.specs: dict[int, AdapterSpec] = {}
        self._next_slot = 1
        self.model = model

    @classmethod
    def wrap(cls, model: nn.Module, dtype: torch.dtype, device: str) -> "LoraSet":
        """Wrap every decoder linear layer of ``model`` (before quantization, which then
        replaces the wrapped ``base`` layers: the deltas stay in ``dtype``)."""
        lora = cls(model, dtype, device)
        for parent, attr, name in decoder_linears(model):
            wrapper = LoraLinear(getattr(parent, attr), lora.rows)
            setattr(parent, attr, wrapper)
            lora.targets[name] = wrapper
        if not lora.targets:
            raise ModelLoadError("no decoder linear layers found to apply LoRA adapters to")
        return lora

    def read(self, name: str, folder: str | Path, *, base_model: str, max_rank: int) -> AdapterSpec:
        return read_adapter(name, folder, base_model=base_model, max_rank=max_rank,
                            targets=self.targets, dtype=self.dtype, device=self.device)

    def install(self, spec: AdapterSpec) -> int:
        """Give ``spec`` a new slot (never reused) and put its weights in the wrappers."""
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        for module, pair in spec.weights.items():
            target = self.targets[module]
            target.weights = {**target.weights, slot: pair}
        self.specs[slot] = spec
        return slot

    def remove(self, slot: int) -> None:
        spec = self.specs.pop(slot, None)
        if spec is None:
            return
        for module in spec.weights:
            target = self.targets[module]
            target.weights = {s: p for s, p in target.weights.items() if s != slot}
