"""Shared test helpers: free ports, real server processes, required tools.

Servers are real ``python app.py`` processes bound to 127.0.0.1 on a free
port and stopped by their PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Records every distinct value a JS expression takes (polled every 10 ms), so a test can see
# text or progress that passes quickly: page.evaluate(WATCH_JS, [name, expression]).
WATCH_JS = """([name, expr]) => {
  window[name] = [];
  window[name + '_timer'] = setInterval(() => {
    const value = eval(expr);
    const seen = window[name];
    if (value && seen[seen.length - 1] !== value) seen.push(value);
  }, 10);
}"""


@contextmanager
def chromium_browser():
    """Debian's chromium driven by Playwright (fails in CI without it, skips locally)."""
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tool(name: str) -> str:
    """Path of a system tool; missing fails in CI (which installs it) and skips locally."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; .ci/run should install it")
    pytest.skip(f"{name} is not installed (CI installs it)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def start_server(env: dict[str, str], log_dir: Path, *, wait_ready: bool = True,
                 timeout: float = 120, args: list[str] | None = None,
                 port: int | None = None) -> ServerProcess:
    port = port or free_port()
    full_env = {**os.environ, "THAI_HOST": "127.0.0.1", "THAI_PORT": str(port),
                "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), *(args or [])], cwd=REPO,
                                env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            response = httpx.get(server.url + "/health", timeout=2)
            if not wait_ready or response.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.log()}")
