"""Starting on a taken port and stopping with SIGTERM, on real ``python app.py`` processes.

A taken port ends the start before anything loads, with one line that names the address
and the setting; SIGTERM after the drain ends the process promptly, with its helper
processes (document readers, the UI's counting process) gone and no thread left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import sys
import time

import httpx
import psutil
import pytest

from tests.support import REPO, run_python, start_server
from thai_ui.text_stats import count_words

MODEL_LOAD_LINES = ("thai.engine.loader", "model ready", "Loading weights")


def test_a_taken_port_ends_the_start_before_the_model_loads(model_env, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, **model_env, "THAI_HOST": "127.0.0.1", "THAI_PORT": str(port),
               "HF_HUB_OFFLINE": "1"}
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(REPO / "app.py")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    print(f"taken port: exit {result.returncode} after {elapsed:.1f}s: {output.strip()}")
    assert result.returncode == 3
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [f"error: 127.0.0.1:{port} is already in use by another process; stop it or "
                     f"choose another port with THAI_PORT=<port> or --port <port>"], output
    assert not any(marker in output for marker in MODEL_LOAD_LINES)
    assert elapsed < 20, "a generous bound for a busy machine: the check precedes every import"
    # README's troubleshooting quotes this very line (for the default address)
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    quoted = lines[0].replace(f"127.0.0.1:{port}", "0.0.0.0:8001")
    assert quoted in readme, quoted


def test_the_port_flag_is_named_the_same_way(model_env):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run([sys.executable, str(REPO / "app.py"), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, **model_env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 3
    assert f"127.0.0.1:{port} is already in use" in result.stderr and "--port" in result.stderr


def test_a_taken_port_is_found_before_the_heavy_imports(model_env):
    # what "before anything loads" means: the settings are read and the port is bound with
    # neither torch, transformers, Gradio nor the engine imported (half a CPU second, not 4)
    probe = ("import sys, app; code = app.main(sys.argv[1:]); "
             "print(code, sorted(m for m in ('torch', 'transformers', 'gradio', 'uvicorn', "
             "'api.engine', 'api.lifecycle') if m in sys.modules))")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_python(probe, "--host", "127.0.0.1", "--port", str(port),
                            env={**os.environ, **model_env})
    assert result.stdout.split() == ["3", "[]"], result.stdout + result.stderr


@pytest.fixture(scope="module")
def ui_server(model_env, tmp_path_factory):
    # a fresh interpreter (not forked): the exit it tests includes the interpreter's teardown
    server = start_server({**model_env, "THAI_DRAIN_TIMEOUT_S": "30"},
                          tmp_path_factory.mktemp("stop"), fork=False)
    yield server
    server.stop()  # SIGTERM first (a test that failed early): its helpers stop with it


def _log_time(log: str, marker: str) -> float:
    """Seconds (from the log line's own timestamp) of the first line containing ``marker``."""
    from datetime import datetime

    line = next(line for line in log.splitlines() if marker in line)
    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def test_sigterm_stops_helpers_and_exits_promptly_after_the_drain(ui_server, browser):
    # Start every kind of helper: the document readers (an upload) and the UI's counting
    # process (a text past the in-process size, typed in a real browser).
    response = httpx.post(ui_server.url + "/v1/summarize/document", timeout=120,
                          files={"file": ("a.txt", "ข่าววันนี้ ฝนตกหนักในกรุงเทพ".encode())},
                          data={"max_tokens": "4"})
    assert response.status_code == 200, response.text
    page = browser.new_page()
    try:
        page.goto(ui_server.url + "/ui/")
        page.wait_for_selector('#model-status [data-state="ready"]', timeout=120_000)
        text = "ข่าววันนี้ " * 600  # past IN_PROCESS_CHARS: counted in the counting process
        page.locator("#thai-input textarea").fill(text)
        # generous: the counting process is spawned on first use (imports PyThaiNLP)
        page.locator("#text-stats").filter(has_text=f"words: {count_words(text):,}").wait_for(
            timeout=240_000)
    finally:
        page.close()
    server = psutil.Process(ui_server.pid)
    helpers = server.children(recursive=True)
    names = [" ".join(p.cmdline())[-60:] for p in helpers]
    assert len(helpers) >= 2, f"the readers and the counter should be running: {names}"

    ui_server.proc.send_signal(signal.SIGTERM)
    code = ui_server.proc.wait(60)
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    log = ui_server.log()
    print("SIGTERM:", [line[24:] for line in log.splitlines()[-4:]])
    assert code == 0, log[-3000:]
    assert not alive, f"helper processes outlived the server: {alive}"
    exit_line = next(line for line in log.splitlines() if "exiting:" in line)
    assert exit_line.endswith("non-daemon threads left: none"), exit_line
    # From the log's own clock: the exit follows the drain by a short step, not the ~10 s
    # of heap teardown it took before (generous for a busy machine).
    assert _log_time(log, "exiting:") - _log_time(log, "draining") < 15


def test_the_exit_line_names_only_threads_that_outlive_a_join():
    # AnyIO's worker threads are told to stop by the event loop's last callbacks and end
    # when the scheduler next runs them; on a busy machine that is after uvicorn returns.
    # The exit line waits for them, so it names only a thread that would hold the exit.
    from api.lifecycle import _join_non_daemon_threads

    stop_now, never = threading.Event(), threading.Event()
    finishing = threading.Thread(target=lambda: stop_now.wait(30), name="told to stop")
    holding = threading.Thread(target=never.wait, name="never told")
    finishing.start()
    holding.start()
    try:
        threading.Timer(0.1, stop_now.set).start()
        # its own two threads: a test worker has others (a client library's loggers)
        left = _join_non_daemon_threads(within_s=3, threads=[finishing, holding])
        assert [t.name for t in left] == ["never told"]
        assert not finishing.is_alive()
    finally:
        never.set()
        stop_now.set()
        holding.join(10)
