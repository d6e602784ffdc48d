"""Start the servers under test on loopback and always stop them.

Every server is a child process in its own session, bound to 127.0.0.1 on a
free port; it is stopped by its PID (SIGTERM to its process group, SIGKILL
after a grace period). ``ServerPool`` remembers every process it started so an
exception or Ctrl-C in the middle of a run still leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    model: str               # the model name requests must carry
    ready_s: float = 0.0     # process start to /health ready
    argv: list[str] = field(default_factory=list)  # the command that started it
    env: dict[str, str] = field(default_factory=dict)  # and the variables set for it

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


class ServerPool:
    """Starts servers and stops all of them on ``close()`` (also used as a context manager)."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = env or {}
        self.servers: list[Server] = []

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int, model: str,
               ready_timeout_s: float, ready_path: str = "/health") -> Server:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "PYTHONUNBUFFERED": "1", **self.env, **env}
        started = time.perf_counter()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(name, proc, f"http://127.0.0.1:{port}", log_path, model, argv=list(argv),
                        env={**self.env, **env})
        self.servers.append(server)
        deadline = started + ready_timeout_s
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    server.ready_s = time.perf_counter() - started
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"{name} not ready in {ready_timeout_s:g}s:\n{server.log_tail()}")

    def start_ours(self, model_dir: str, *, lora_dir: str = "", max_batch_size: int = 64,
                   max_waiting: int = 4096, device: str = "auto", dtype: str = "auto",
                   quantization: str = "none", ready_timeout_s: float = 300,
                   extra_env: dict[str, str] | None = None) -> Server:
        """Our server on ``model_dir``. ``quantization`` is none unless asked: the benchmarks
        compare it with other systems on the same weights (the product's default is auto)."""
        port = free_port()
        env = {
            "THAI_HOST": "127.0.0.1", "THAI_PORT": str(port),
            "THAI_BASE_MODEL": model_dir, "THAI_LORA_PATH": lora_dir, "THAI_REQUIRE_MODEL": "true",
            "THAI_MAX_BATCH_SIZE": str(max_batch_size), "THAI_MAX_WAITING": str(max_waiting),
            "THAI_DEVICE": device, "THAI_DTYPE": dtype, "THAI_QUANTIZATION": quantization,
            "THAI_ENABLE_UI": "false",
            "THAI_ACCESS_LOG": "false", "THAI_LOG_LEVEL": "warning",
            "THAI_SERVED_MODEL_NAME": "bench", "THAI_RATE_LIMIT_PER_MINUTE": "0",
            "THAI_MAX_CONNECTIONS_PER_CLIENT": "256",  # every level's streams come from one address
            "THAI_API_KEYS": "", "THAI_API_KEY_FILE": "", **(extra_env or {}),
        }
        return self._spawn("ours", [sys.executable, str(REPO / "app.py")], env, port, "bench",
                           ready_timeout_s)

    def start_transformers_serve(self, model_dir: str, *, continuous_batching: bool,
                                 device: str = "cpu", dtype: str = "auto",
                                 ready_timeout_s: float = 300) -> Server:
        port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        argv = [str(exe), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--device", device, "--dtype", dtype, "--log-level", "warning",
                "--continuous-batching" if continuous_batching else "--no-continuous-batching"]
        name = "transformers-serve" + ("-cb" if continuous_batching else "")
        return self._spawn(name, argv, {}, port, model_dir, ready_timeout_s)

    def start_llama_server(self, exe: str, gguf: str, *, name: str = "llama.cpp", parallel: int = 8,
                           ctx_per_slot: int = 1024, threads: int = 2,
                           ready_timeout_s: float = 300) -> Server:
        """llama.cpp's llama-server (``bench/llamacpp.py``); /health answers 200 once loaded."""
        from bench.llamacpp import SERVED_MODEL, server_argv

        port = free_port()
        argv = server_argv(exe, gguf, port, parallel=parallel, ctx_per_slot=ctx_per_slot,
                           threads=threads)
        return self._spawn(name, argv, {}, port, SERVED_MODEL, ready_timeout_s)
