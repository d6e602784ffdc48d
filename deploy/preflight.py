"""Pre-flight checks: the original design's troubleshooting cases, caught before loading anything.

Each check returns :class:`Check` results with a message that says what is
wrong and what to do: the port is taken (and by which process), the adapter
folder is missing or incomplete, the base model is neither on disk nor
downloadable, or the GPU (or RAM) has too little free memory for the chosen
dtype. ``host_model.py`` prints them and refuses to start on a failure.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from api.engine.loader import base_model_cached, hub_reachable, missing_adapter_message
from api.settings import ModelSettings, ServerSettings

GIB = 1024**3
OVERHEAD = 1.2  # activations, KV cache of a small batch, allocator slack
CUDA_CONTEXT_BYTES = GIB // 2
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "8bit": 1.0, "4bit": 0.5,
                   "int8": 1.0, "w8a8": 1.0}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    message: str


def check_port(host: str, port: int) -> Check:
    """Bind the address the way uvicorn will; on failure name the process holding it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return Check("port", "fail", f"port {port} is already in use ({exc.strerror}) "
                             f"{port_owner(port)}; stop it, or choose another port with THAI_PORT / --port")
            if exc.errno == errno.EACCES:
                return Check("port", "fail", f"binding {host}:{port} needs privileges: use a port above "
                             "1023 (nginx listens on 80/443)")
            return Check("port", "fail", f"cannot bind {host}:{port}: {exc.strerror}; check THAI_HOST")
    return Check("port", "ok", f"{host}:{port} is free")


def port_owner(port: int) -> str:
    """``by PID 123 (python app.py ...)``, or how to find out when the kernel will not say."""
    import psutil

    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        connections = []
    for conn in connections:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                proc = psutil.Process(conn.pid)
                command = " ".join(" ".join(proc.cmdline()).split()) or proc.name()
            except psutil.Error:
                command = "?"
            if len(command) > 120:
                command = command[:117] + "..."
            return f"by PID {conn.pid} ({command}): `kill {conn.pid}`"
    return f"by a process this user cannot see: run `sudo lsof -i :{port}`"


def check_model_files(model: ModelSettings) -> list[Check]:
    """Adapter folder complete, base model on disk, cached or downloadable."""
    severity = "fail" if model.require_model else "warn"
    fallback = "" if model.require_model else " (the server will fall back to the demo checkpoint)"
    checks = []
    if model.lora_path:
        problem = missing_adapter_message(model.lora_path)
        checks.append(Check("adapter", severity, problem + fallback) if problem else
                      Check("adapter", "ok", f"adapter found at {model.lora_path}"))
    base = model.base_model
    if Path(base).expanduser().is_dir():
        has_config = (Path(base).expanduser() / "config.json").exists()
        checks.append(Check("base model", "ok", f"local folder {base}") if has_config else
                      Check("base model", severity, f"{base} has no config.json{fallback}"))
    elif base_model_cached(base):
        checks.append(Check("base model", "ok", f"{base} is in the Hugging Face cache"))
    elif hub_reachable(model.hub_timeout_s):
        checks.append(Check("base model", "ok", f"{base} will be downloaded from the Hugging Face hub"))
    else:
        checks.append(Check("base model", severity, f"{base} is not on disk or in the Hugging Face cache "
                            f"and the hub cannot be reached{fallback}"))
    return checks


def base_model_config(base: str) -> dict | None:
    """The base model's config.json from its folder or the Hugging Face cache, else None."""
    path = Path(base).expanduser() / "config.json"
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base, "config.json")
        except Exception:  # invalid repo id and the like
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def estimate_parameters(config: dict) -> int:
    """Parameter count of a decoder-only transformer (Qwen2/Llama layout) from its config."""
    config = config.get("text_config", config)
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    inter = int(config.get("intermediate_size", 4 * hidden))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + q_dim + 2 * kv_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * per_layer + hidden


def weight_format(model: ModelSettings, device: str) -> str:
    """The key of :data:`BYTES_PER_PARAM` the loader will use on ``device``. With
    THAI_QUANTIZATION=auto the model is loaded unquantized first (and stays so if w8a8's
    measured cost is too high), so that is what has to fit."""
    if model.quantization not in ("none", "auto"):
        return model.quantization
    if model.dtype != "auto":
        return model.dtype
    if device == "cuda":
        return "bfloat16"
    from api.engine.loader import cpu_bf16_flags  # auto picks bf16 on CPUs with native bf16

    return "bfloat16" if cpu_bf16_flags() else "float32"


def memory_verdict(parameters: int, fmt: str, free_bytes: int, total_bytes: int, where: str) -> Check:
    """Enough free memory for the weights plus working room? If not, what would fit."""
    extra = CUDA_CONTEXT_BYTES if where.startswith("GPU") else 0
    need = int(parameters * BYTES_PER_PARAM[fmt] * OVERHEAD) + extra
    count = f"{parameters / 1e9:.2f} B" if parameters >= 1e8 else f"{parameters / 1e6:.1f} M"
    summary = (f"{count} parameters in {fmt} need about {need / GIB:.1f} GiB; "
               f"{where} has {free_bytes / GIB:.1f} GiB free of {total_bytes / GIB:.1f} GiB")
    if need <= free_bytes:
        return Check("memory", "ok", summary)
    fits = [f"THAI_QUANTIZATION={q} (about {(parameters * BYTES_PER_PARAM[q] * OVERHEAD + extra) / GIB:.1f} GiB)"
            for q in ("8bit", "4bit") if BYTES_PER_PARAM[q] < BYTES_PER_PARAM[fmt] and where.startswith("GPU")]
    advice = ", ".join(fits + (["THAI_DEVICE=cpu"] if where.startswith("GPU") else []))
    other = "stop other GPU processes (nvidia-smi)" if where.startswith("GPU") else "free RAM"
    return Check("memory", "fail", f"not enough memory: {summary}; use {advice or 'a smaller model'} "
                 f"or {other}")


def check_memory(model: ModelSettings) -> list[Check]:
    """GPU memory for the chosen dtype when CUDA is used; RAM on CPU."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    checks = []
    if model.device == "cuda" and not cuda:
        return [Check("device", "fail", "THAI_DEVICE=cuda but no CUDA device is visible to torch: install "
                      "the CUDA build of torch (see README) or use THAI_DEVICE=cpu")]
    device = "cuda" if cuda and model.device != "cpu" else "cpu"
    if model.quantization in ("int8", "w8a8") and device != "cpu":
        return [Check("device", "fail", f"THAI_QUANTIZATION={model.quantization} is for the CPU; "
                      "on a GPU use 8bit, 4bit or none")]
    if model.quantization in ("8bit", "4bit") and device != "cuda":
        return [Check("device", "fail", f"THAI_QUANTIZATION={model.quantization} needs a CUDA GPU; "
                      "use THAI_QUANTIZATION=none on CPU")]
    if device == "cpu":
        hint = ""
        if model.device == "auto" and shutil.which("nvidia-smi"):
            hint = " although nvidia-smi is installed: torch is the CPU build (see README for CUDA)"
        reason = "THAI_DEVICE=cpu" if model.device == "cpu" else f"no CUDA device visible to torch{hint}"
        checks.append(Check("device", "warn" if hint else "ok",
                            f"running on CPU ({reason}): a 150-token summary of a page of Thai "
                            "takes about 20 s on 2 cores with the default w8a8 (bench/RESULTS.md)"))
    else:
        checks.append(Check("device", "ok", f"CUDA: {torch.cuda.get_device_name(0)}"))
    config = base_model_config(model.base_model)
    if config is None:
        checks.append(Check("memory", "warn", f"cannot estimate memory: no local config.json for "
                            f"{model.base_model} (it is downloaded at start)"))
        return checks
    try:
        parameters = estimate_parameters(config)
    except (KeyError, TypeError, ValueError) as exc:
        checks.append(Check("memory", "warn", f"cannot estimate memory from config.json: missing {exc}"))
        return checks
    fmt = weight_format(model, device)
    if device == "cuda":
        free, total = torch.cuda.mem_get_info(0)
        checks.append(memory_verdict(parameters, fmt, free, total, "GPU 0"))
    else:
        vm = psutil.virtual_memory()
        checks.append(memory_verdict(parameters, fmt, vm.available, vm.total, "RAM"))
    return checks


def run_checks(model: ModelSettings, server: ServerSettings) -> list[Check]:
    return [check_port(server.host, server.port), *check_model_files(model), *check_memory(model)]
