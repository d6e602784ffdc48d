"""Shared test helpers: free ports, real server processes, required tools.

Servers are real ``app.py`` processes bound to 127.0.0.1 on a free port and stopped by
their PID. Most are forked from ``tests.server_zygote``, after the imports every server
makes; a server whose environment differs in more than THAI_ settings, or a test that asks
for ``fork=False``, gets a fresh ``python app.py``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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

# Records what the page's Gradio client reads from its event streams (/queue/data), as it
# reads it: context.add_init_script(GRADIO_TAP_JS) before the page loads, then
# gradio_events(page). How many updates a stream carried is the server's doing (one per
# yield), unlike how many of them a busy browser happened to paint.
GRADIO_TAP_JS = r"""(() => {
  window.__gradio_sse = [];
  const original = window.fetch;
  window.fetch = async function (...args) {
    const response = await original.apply(this, args);
    const url = args[0] instanceof Request ? args[0].url : String(args[0]);
    if (!url.includes('/queue/data') || !response.body) return response;
    const [mine, theirs] = response.body.tee();
    (async () => {
      const reader = mine.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        window.__gradio_sse.push(decoder.decode(value, {stream: true}));
      }
    })();
    return new Response(theirs, {status: response.status, statusText: response.statusText,
                                 headers: response.headers});
  };
})();"""


def gradio_events(page) -> dict[str, list[dict]]:
    """The Gradio messages the page received so far (GRADIO_TAP_JS), by event, in order."""
    import json

    raw = "".join(page.evaluate("window.__gradio_sse || []"))
    events: dict[str, list[dict]] = {}
    for line in raw.splitlines():
        if line.startswith("data: "):
            message = json.loads(line[6:])
            if message.get("event_id"):
                events.setdefault(message["event_id"], []).append(message)
    return events


def completed_output(messages: list[dict]) -> list | None:
    """An event's final output values (its process_completed message), if it completed."""
    done = [m for m in messages if m.get("msg") == "process_completed"]
    return done[-1]["output"].get("data") if done and done[-1].get("success") else None


def as_textarea_shows(text: str) -> str:
    """``text`` as a textarea's value reads it: the HTML spec normalizes CR LF and a lone CR to
    LF, and the demo model's random tokens can include a carriage return."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def describe_events(events: dict[str, list[dict]]) -> str:
    """One line per event: its messages' kinds and how it ended, for a failing assertion."""
    lines = []
    for event_id, messages in events.items():
        last = messages[-1]
        data = (last.get("output") or {}).get("data") if isinstance(last.get("output"), dict) \
            else None
        first_value = (repr(data[0][:40]) + "..." + repr(data[0][-40:])
                       if data and isinstance(data[0], str) else repr(data)[:80])
        lines.append(f"{event_id[:8]}: {[m.get('msg') for m in messages][-6:]} "
                     f"({len(messages)} messages) success={last.get('success')} "
                     f"first output={first_value}")
    return "\n".join(lines) or "none"


def completed_event(page, predicate, timeout_s: float = 120) -> list[dict]:
    """The messages of the first completed event whose final output satisfies ``predicate``,
    waiting for it (bounded) while the page runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        for messages in gradio_events(page).values():
            output = completed_output(messages)
            if output is not None and predicate(output):
                return messages
        if time.monotonic() > deadline:
            raise AssertionError("no such Gradio event completed; the page's events: "
                                 + describe_events(gradio_events(page)))
        page.wait_for_timeout(200)


def streamed_updates(messages: list[dict]) -> list[list]:
    """Every output's value after each update of one streaming event, in order: the first
    update carries the values, later ones Gradio's diffs (applied as its client does)."""
    from gradio_client.utils import apply_diff

    updates: list[list] = []
    for message in messages:
        if message.get("msg") not in ("process_generating", "process_streaming"):
            continue
        data = message["output"]["data"]
        updates.append(list(data) if not updates else
                       [apply_diff(value, diff) for value, diff in zip(updates[-1], data)])
    return updates


def streamed_values(messages: list[dict], index: int) -> list:
    """The distinct successive values output ``index`` of one event took while it streamed."""
    values: list = []
    for update in streamed_updates(messages):
        if not values or values[-1] != update[index]:
            values.append(update[index])
    return values


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


# Ports for test servers come from below the kernel's ephemeral range (32768-60999 by
# default), where the suite's own client sockets never land; each pytest-xdist worker (gw0,
# gw1, ...) draws at random from its own slice, so two workers never pick the same port (a
# server starting holds no port until it binds); start_server retries a port lost anyway.
PORT_BASE, PORT_SLICE = 20000, 1500


def _port_slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = PORT_BASE + (index % 8) * PORT_SLICE
    return start, start + PORT_SLICE


def free_port() -> int:
    for _ in range(50):
        port = random.randrange(*_port_slice())
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
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
    proc: subprocess.Popen | ForkedProcess
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


class ForkedProcess:
    """A server forked by the run's :class:`ServerForker`, used as a ``subprocess.Popen``:
    ``pid``, ``poll``, ``wait``, ``send_signal``, ``returncode``."""

    def __init__(self, forker: "ServerForker", pid: int) -> None:
        self.forker = forker
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.forker.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"server {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ServerForker:
    """This run's ``tests.server_zygote``, shared by its test workers: servers forked after
    the imports every server makes (the module says why and what stays a real
    ``python app.py``). The first worker that needs it starts it; each connects once."""

    _instance: "ServerForker | None" = None

    def __init__(self) -> None:
        from filelock import FileLock

        # One per run: pytest-xdist gives every worker of a run the same id.
        run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
        path = Path(tempfile.gettempdir()) / f"thai-test-zygote-{run_id[:16]}.sock"
        with FileLock(f"{path}.lock"):
            try:
                self.sock = self._connect(path)
            except OSError:  # none yet, or the last one ended with its last worker
                path.unlink(missing_ok=True)
                # Its own session: the zygote outlives the worker that starts it.
                starter = subprocess.Popen(
                    [sys.executable, "-m", "tests.server_zygote", "--listen", str(path)],
                    cwd=REPO, env={**SERVER_BASE_ENV, **FORKED_ENV}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, text=True, start_new_session=True)
                starter.stdout.readline()  # ready (it listens), or gone (EOF)
                starter.stdout.close()
                self.sock = self._connect(path)
        self.stream = self.sock.makefile("rw", encoding="utf-8", newline="\n")
        self.lock = threading.Lock()
        hello = json.loads(self.stream.readline() or "{}")
        self.env: dict[str, str] = hello.get("env", {})
        self.usable = bool(hello.get("ready"))

    @staticmethod
    def _connect(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return sock

    @classmethod
    def get(cls) -> "ServerForker | None":
        if os.environ.get("THAI_TEST_FORK_SERVERS", "1") == "0":
            return None
        if cls._instance is None or cls._instance.stream.closed:
            try:
                cls._instance = cls()
            except OSError:  # the zygote did not start: servers are fresh interpreters
                return None
            atexit.register(cls._instance.close)
        return cls._instance if cls._instance.usable else None

    def _ask(self, message: dict) -> dict:
        with self.lock:
            self.stream.write(json.dumps(message) + "\n")
            self.stream.flush()
            return json.loads(self.stream.readline())

    # Variables that differ from worker to worker and that only the tests read.
    PER_WORKER = frozenset({"PYTEST_XDIST_WORKER"})

    def can_start(self, env: dict[str, str]) -> bool:
        """Only a server whose environment differs from the forking process's in THAI_
        settings alone: other variables may be read while the libraries import (OMP_*, HF_*)."""
        keys = (set(env) | set(self.env)) - self.PER_WORKER
        return all(key.startswith("THAI_") or env.get(key) == self.env.get(key) for key in keys)

    def start(self, env: dict[str, str], args: list[str], log_path: Path, *,
              module: str | None = None, stderr: Path | None = None) -> ForkedProcess:
        """app.py (or ``python -m module``), output to ``log_path`` (stderr apart if given)."""
        return ForkedProcess(self, self._ask({
            "op": "start", "env": env, "argv": args, "log": str(log_path), "module": module,
            "stderr": str(stderr or log_path)})["pid"])

    def poll(self, pid: int) -> int | None:
        return self._ask({"op": "poll", "pid": pid})["code"]

    def close(self) -> None:
        """This worker's connection; the zygote kills the servers it started for it."""
        with self.lock:
            if not self.stream.closed:
                self.stream.close()
                self.sock.close()


# What a test server inherits: the test run's environment as it was when the run started.
# Variables set later in a test worker (pytest's PYTEST_CURRENT_TEST, a client library's
# switches, Gradio's GRADIO_TEMP_DIR and HF_HUB_DISABLE_TELEMETRY after an in-process UI)
# are that worker's, not settings for the servers, and would make every later server a
# fresh interpreter instead of a fork.
SERVER_BASE_ENV = dict(os.environ)
# The environment every test server gets besides its own settings.
FORKED_ENV = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def process_env(**settings: str) -> dict[str, str]:
    """The whole environment for a process a test starts (a CLI): the servers' own, so that
    one differing in THAI_ settings alone is forked, plus ``settings``."""
    return {**SERVER_BASE_ENV, **FORKED_ENV, **settings}


class ModuleRun:
    """``python -m MODULE ARGS`` (``python app.py ARGS`` for no module) in the repository
    with ``env``, as a ``subprocess.Popen`` whose output is captured as text: forked after
    the imports when only THAI_ settings differ from the servers' environment
    (:class:`ServerForker`), a fresh interpreter otherwise."""

    def __init__(self, module: str | None, args: list, env: dict[str, str]) -> None:
        program = ["-m", module] if module else [str(REPO / "app.py")]
        self.args = [sys.executable, *program, *map(str, args)]
        self.folder = Path(tempfile.mkdtemp(prefix="module-run-"))
        self.stdout_path, self.stderr_path = self.folder / "stdout", self.folder / "stderr"
        forker = ServerForker.get()
        if forker is not None and forker.can_start(env):
            self.proc = forker.start(env, self.args[1 + len(program):], self.stdout_path,
                                     module=module, stderr=self.stderr_path)
        else:
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=out,
                                             stderr=err)
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit; (stdout, stderr). ``subprocess.TimeoutExpired`` as Popen's."""
        self.proc.wait(timeout)
        try:
            return (self.stdout_path.read_text(errors="replace"),
                    self.stderr_path.read_text(errors="replace"))
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code args`` in a fresh interpreter in the repository, output captured as
    text: for a probe of what a process of its own loads or writes."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_module(module: str | None, args: list, env: dict[str, str], *,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([python, "-m", module, *args], capture_output=True, text=True)``
    (``python app.py`` for no module), forked where :class:`ModuleRun` can."""
    run = ModuleRun(module, args, env)
    try:
        stdout, stderr = run.communicate(timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def start_server(env: dict[str, str], log_dir: Path, *, wait_ready: bool = True,
                 timeout: float = 300, args: list[str] | None = None,
                 port: int | None = None, fork: bool = True) -> ServerProcess:
    """A real server on ``port`` (a free one by default: retried on another if something
    else bound it between the choice and the server's bind). ``timeout`` is a hang guard:
    on a busy 2-core machine a start (imports, model load) can take minutes."""
    if port is not None:
        return _start_server(env, log_dir, wait_ready=wait_ready, timeout=timeout, args=args,
                             port=port, fork=fork)
    for attempt in range(3):
        try:
            return _start_server(env, log_dir, wait_ready=wait_ready, timeout=timeout,
                                 args=args, port=free_port(), fork=fork)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """The server could not bind its port (another process took it first)."""


def _start_server(env: dict[str, str], log_dir: Path, *, wait_ready: bool, timeout: float,
                  args: list[str] | None, port: int, fork: bool) -> ServerProcess:
    full_env = {**SERVER_BASE_ENV, "THAI_HOST": "127.0.0.1", "THAI_PORT": str(port), **FORKED_ENV,
                **env}
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    forker = ServerForker.get() if fork else None
    if forker is not None and forker.can_start(full_env):
        proc = forker.start(full_env, args or [], log_path)
    else:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), *(args or [])],
                                    cwd=REPO, env=full_env, stdout=log_file,
                                    stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = server.log()
            if "address already in use" in log.lower():
                raise PortTaken(f"port {port} taken:\n{log}")
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log}")
        try:
            response = httpx.get(server.url + "/health", timeout=2)
            if not wait_ready or response.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {timeout}s:\n{server.log()}")


def proc_cost(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


def idle_engine(url: str, timeout_s: float = 120) -> None:
    """Wait (bounded) until the engine holds no request, running or waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health", timeout=30).json()
        if health["requests_running"] == 0 and health["requests_waiting"] == 0:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
