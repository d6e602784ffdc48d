"""Quantized weights kept between starts (``THAI_QUANT_CACHE_DIR``).

Quantizing a checkpoint at start-up costs far more than loading it: ``auto`` loads the
full-precision model, merges the adapter, measures the KL of w8a8 on a Thai text and
converts every linear layer. None of that changes while the checkpoint, the adapter and
the setting stay the same, so the first start writes the result (int8 weights, scales,
everything else as loaded, and the reason ``/health`` shows) to one folder per key, and
the next start builds the model from it: a skeleton without memory (``accelerate``'s
``init_empty_weights``), each layer read from the file (``pread``) and packed for fbgemm in
turn, so the full-precision weights are never in memory and the peak stays near the final
size.

The key is a SHA-256 over the *content* of the files that define the weights (base model
weights and config, adapter, tokenizer: ``auto``'s probe reads it), the setting
(``THAI_QUANTIZATION``, ``THAI_QUANTIZATION_MAX_KL``, dtype), torch's version and the
CPU's instruction sets. Hashing 3 GB on every start would cost seconds, so each file's
digest is remembered (``digests.json``) beside its size, modification time and inode and
is recomputed only when one of them changes: a copy of the same checkpoint elsewhere
hits the same entry, an edited one misses. A file rewritten in place with the same size
and the same nanosecond mtime would be trusted; nothing but a deliberate ``touch -d``
does that.

An entry is written to a temporary folder and renamed into place, so a reader sees a
whole entry or none. On reading, the file's size, its header and the list of tensors
are checked against the entry's ``meta.json``; anything that does not match (a truncated
or overwritten file, another format) is logged, removed and rebuilt. The tensors' bytes
are not re-hashed on every start (that would cost as much as the load): the atomic write
is what keeps them whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("thai.engine.quant_cache")

FORMAT = 1
WEIGHTS, META, DIGESTS = "weights.safetensors", "meta.json", "digests.json"
CACHED_SETTINGS = ("auto", "int8", "w8a8", "int4")
# The instruction sets that decide which kernels (and 7- or 8-bit activations) run.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16",
                "amx_bf16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
DTYPES = {"I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64", "F16": "float16",
          "BF16": "bfloat16", "F32": "float32", "F64": "float64", "BOOL": "bool"}


def _safetensors_dtype(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return next(code for code, torch_name in DTYPES.items() if torch_name == name)


def checkpoint_files(base_model: str, adapter: str | None) -> list[tuple[str, Path]]:
    """(label, path) of every file that defines the merged weights or the probe's tokens."""
    base = Path(base_model)
    if not base.is_dir():  # a hub id: its snapshot folder in the Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base_model, "config.json")
        if not isinstance(found, str):
            raise OSError(f"{base_model!r} is not in the Hugging Face cache")
        base = Path(found).parent
    folders = [("base", base)] + ([("adapter", Path(adapter))] if adapter else [])
    return [(f"{label}/{path.name}", path) for label, folder in folders
            for path in sorted(folder.iterdir())
            if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES)]


class QuantCache:
    """One key's entry in the cache folder: :meth:`load` it, or :meth:`store` a loaded model."""

    def __init__(self, root: Path, key: str, description: dict[str, Any]):
        self.root, self.key, self.description = root, key, description
        self.entry = root / key[:40]

    # ------------------------------------------------------------------ the key
    @classmethod
    def for_settings(cls, settings, source, device: str, dtype, flags) -> "QuantCache | None":
        """The cache entry for this start, or None where the cache does not apply (off, a GPU,
        no quantization, an unmerged adapter) or the checkpoint's files cannot be read."""
        if not settings.quant_cache_dir or device != "cpu":
            return None
        if settings.quantization not in CACHED_SETTINGS:
            return None
        if source.adapter and not settings.merge_lora:
            return None
        import torch

        root = Path(settings.quant_cache_dir).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            digests = _Digests(root / DIGESTS)
            files = {label: digests.of(path)
                     for label, path in checkpoint_files(source.base_model, source.adapter)}
            digests.save()
        except OSError as exc:
            log.warning("quantized-weight cache off for this start: %s", exc)
            return None
        description = {
            "format": FORMAT, "files": files, "quantization": settings.quantization,
            "max_kl": settings.quantization_max_kl if settings.quantization == "auto" else None,
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "cpu": sorted(f for f in CPU_FEATURES if f in flags)}
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        log.info("quantized-weight cache key %s (%d files, %.1f s)", key[:16], len(files),
                 time.perf_counter() - started)
        return cls(root, key, description)

    # ------------------------------------------------------------------ read
    def load(self, base_model: str, dtype, flags) -> tuple[Any, str, str] | None:
        """(model, quantization, reason) from the entry, or None (missing, stale or damaged:
        a damaged entry is removed so this start's :meth:`store` writes it again). Where
        ``auto`` measured w8a8 and refused it, the model is None: load the weights as they
        are, without measuring again."""
        meta_path = self.entry / META
        if not meta_path.exists():
            log.info("quantized-weight cache: no entry for this checkpoint and setting in %s",
                     self.root)
            return None
        started = time.perf_counter()
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") != self.key or meta.get("format") != FORMAT:
                raise ValueError("the entry belongs to another key or format")
            if meta["runs"] == "none":  # auto measured and refused: no probe this time
                log.info("quantized-weight cache: auto's verdict for these weights is kept in %s",
                         self.entry)
                return None, "none", f"{meta['reason']} [verdict kept in the quantized-weight cache]"
            weights = self.entry / WEIGHTS
            if weights.stat().st_size != meta["size"]:
                raise ValueError(f"{WEIGHTS} is {weights.stat().st_size} bytes, "
                                 f"{meta['size']} expected")
            model = _build(base_model, dtype, weights, meta, flags)
        except Exception as exc:  # anything unreadable: rebuild rather than fail the start
            log.warning("quantized-weight cache entry %s is unusable (%s: %s); removing it and "
                        "quantizing again", self.entry, type(exc).__name__, exc)
            shutil.rmtree(self.entry, ignore_errors=True)
            return None
        seconds = time.perf_counter() - started
        log.info("quantized weights loaded from the cache %s in %.1f s", self.entry, seconds)
        return (model, meta["runs"],
                f"{meta['reason']} [loaded from the quantized-weight cache in {seconds:.1f} s]")

    # ------------------------------------------------------------------ write
    def store(self, model, quantization: str, reason: str) -> bool:
        """Write the quantized model as an entry; where ``auto`` refused w8a8, only its
        verdict. Failures are logged, never raised: the start goes on."""
        verdict = (quantization == "none" and self.description["quantization"] == "auto"
                   and "measured" in reason)  # auto's refusal: the KL it measured is kept
        if not (verdict or quantization in ("int8", "w8a8", "int4")) or (self.entry / META).exists():
            return False
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            size, layers, aliases = (0, {}, {}) if verdict else _write(model, tmp / WEIGHTS)
            meta = {"key": self.key, "size": size, "layers": layers, "aliases": aliases,
                    "runs": quantization, "reason": reason,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "made_from": self.description, "format": FORMAT}
            (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _fsync(tmp / META)
            os.rename(tmp, self.entry)  # whole entry or none; fails if another start won
        except OSError as exc:
            log.warning("quantized weights not cached (%s)", exc)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        log.info("quantized weights cached in %s (%.0f MiB, %.1f s)", self.entry, size / 2**20,
                 time.perf_counter() - started)
        return True


class _Digests:
    """SHA-256 of files, remembered by (size, mtime_ns, inode) in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, list] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def of(self, path: Path) -> str:
        real = str(path.resolve())
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self.known.get(real)
        if isinstance(known, list) and known[:3] == stamp:
            return known[3]
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        self.known[real] = [*stamp, digest.hexdigest()]
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            _atomic_write(self.path, json.dumps(self.known, indent=0).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the file
def _tensors(model) -> tuple[list[tuple[str, Any]], dict[str, str], dict[str, str]]:
    """(name, tensor or layer) in writing order, the quantized layers' kinds, and aliases
    (a tensor shared under a second name is written once)."""
    from api.engine.quantize import Int4Linear, Int8Linear, W8A8Linear

    items: list[tuple[str, Any]] = []
    layers: dict[str, str] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, W8A8Linear):
            layers[module_name] = "w8a8"
            items.append((module_name, module))
            if module.bias is not None:
                items.append((prefix + "bias", module.bias))
            continue
        if isinstance(module, (Int8Linear, Int4Linear)):
            layers[module_name] = "int8" if isinstance(module, Int8Linear) else \
                f"int4:{module.in_features}:{module.group}"
        if any(module_name.startswith(f"{layer}.") for layer in layers):
            continue
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            if id(tensor) in seen:
                aliases[prefix + name] = seen[id(tensor)]
                continue
            seen[id(tensor)] = prefix + name
            items.append((prefix + name, tensor.detach()))
    return items, layers, aliases


def _write(model, path: Path) -> tuple[int, dict[str, str], dict[str, str]]:
    """Stream the model into a safetensors file one tensor at a time (a w8a8 layer is
    unpacked only while it is written), so writing needs no second copy of the model."""
    import torch

    items, layers, aliases = _tensors(model)
    header: dict[str, Any] = {"__metadata__": {"format": f"thai-quant-{FORMAT}"}}
    plan = []
    for name, item in items:
        if isinstance(item, torch.Tensor):
            plan.append((name, item.dtype, tuple(item.shape), item))
        else:  # a W8A8Linear: its int8 weights and float64 scales
            plan.append((f"{name}.qweight", torch.int8, (item.out_features, item.in_features), item))
            plan.append((f"{name}.qscales", torch.float64, (item.out_features,), item))
    plan.sort(key=lambda p: -p[1].itemsize)  # widest first: every tensor stays aligned
    offset = 0
    for name, dtype, shape, _ in plan:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _safetensors_dtype(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, _, _, item in plan:
            if isinstance(item, torch.Tensor):
                tensor = item
            else:
                qweight, scales = item.int8_weight()
                tensor = qweight if name.endswith(".qweight") else scales
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(head) + offset, layers, aliases


def _build(base_model: str, dtype, weights: Path, meta: dict, flags):
    """The quantized model from an entry: an empty skeleton of the base model's
    architecture, every tensor assigned from the file, each quantized layer rebuilt."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from api.engine.quantize import Int4Linear, Int8Linear, W8A8Linear, w8a8_reduce_range

    config = AutoConfig.from_pretrained(base_model)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base_model)
    except OSError:
        pass
    layers: dict[str, str] = meta["layers"]
    reduce_range = w8a8_reduce_range(flags)
    # pread, not mmap: each tensor is read into memory of its own, and a w8a8 layer's int8
    # bytes are freed once packed; mapped, every page read would stay resident (and counted)
    # until the file is closed, the whole file on top of the packed copy.
    with safe_open(str(weights), framework="pt", backend="pread") as f:
        names = set(f.keys())

        def module_at(path: str):
            return model.get_submodule(path) if path else model

        def build_layer(name: str):
            kind = layers[name]
            bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
            if kind == "w8a8":
                layer = W8A8Linear.from_int8(f.get_tensor(f"{name}.qweight"),
                                             f.get_tensor(f"{name}.qscales"), bias, reduce_range)
            elif kind.startswith("int4:"):
                _, in_features, group = kind.split(":")
                layer = Int4Linear(f.get_tensor(f"{name}.weight"),
                                   f.get_tensor(f"{name}.scales_and_zeros"), bias,
                                   int(in_features), int(group))
            else:
                layer = Int8Linear(f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.scales"),
                                   bias)
            return name, layer

        # fbgemm packs on one core: one layer per thread, each set in place when ready
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            for name, layer in pool.map(build_layer, layers):
                parent, _, attr = name.rpartition(".")
                setattr(module_at(parent), attr, layer)
        owned = {f"{name}.{suffix}" for name in layers
                 for suffix in ("qweight", "qscales", "weight", "scales", "scales_and_zeros",
                                "bias")}
        for name in sorted(names - owned):
            parent, _, attr = name.rpartition(".")
            _assign(module_at(parent), attr, f.get_tensor(name))
    for alias, name in meta["aliases"].items():
        parent, _, attr = alias.rpartition(".")
        source_parent, _, source_attr = name.rpartition(".")
        source = module_at(source_parent)
        _assign(module_at(parent), attr,
                source._parameters.get(source_attr, source._buffers.get(source_attr)))
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"the entry lacks {len(empty)} tensors (first: {empty[0]})")
    return model.eval()


def _assign(module, name: str, tensor) -> None:
    from torch import nn

    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor
