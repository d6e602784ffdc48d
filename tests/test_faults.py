"""Faults: out-of-memory in a generation step, a crashed engine worker, a model that cannot load.

The first two run the real app and the real engine on the generated checkpoint
in-process, so the scheduler's fault hook can inject the failure into a step;
the last starts ``app.py`` as production would.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from fastapi.testclient import TestClient

from api.server import create_app
from api.settings import Settings
from tests.support import free_port, process_env, run_module

CHAT = {"messages": [{"role": "user", "content": "สวัสดีครับ"}], "max_tokens": 8}


class WorkerCrash(BaseException):
    """Not an ``Exception``: nothing in the step guard catches it, like a fatal fault."""


def faults_once(phase: str, error: BaseException):
    """A fault injector that raises ``error`` the first time ``phase`` runs."""
    fired = []

    def inject(current: str) -> None:
        if current == phase and not fired:
            fired.append(current)
            raise error

    return inject


@pytest.fixture
def real_app(demo_checkpoint):
    base, lora = demo_checkpoint
    settings = Settings.from_overrides({"base_model": str(base), "lora_path": str(lora),
                                        "require_model": True, "enable_ui": False})
    app = create_app(settings)
    exits = []
    app.state.shutdown_hook = lambda: exits.append(time.monotonic())
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 300
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.1)
        yield client, app, exits


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_out_of_memory_is_503_and_the_next_request_succeeds(real_app, phase):
    client, app, exits = real_app
    scheduler = app.state.engine.scheduler
    scheduler.fault_injector = faults_once(phase, torch.OutOfMemoryError("CUDA out of memory (injected)"))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "out_of_memory"
    assert r.headers["Retry-After"].isdigit()
    # The half-written cache was dropped and no sequence is left behind.
    assert scheduler._kv.cache is None and scheduler.stats() == (0, 0)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert client.get("/ready").status_code == 200 and not exits


def test_out_of_memory_mid_stream_ends_with_an_error_event(real_app):
    client, app, _ = real_app
    scheduler = app.state.engine.scheduler
    steps = []

    def oom_on_fifth_decode(phase: str) -> None:
        if phase == "decode":
            steps.append(phase)
            if len(steps) == 5:
                raise torch.OutOfMemoryError("out of memory (injected)")

    scheduler.fault_injector = oom_on_fifth_decode
    body = {**CHAT, "max_tokens": 30, "min_tokens": 30, "ignore_eos": True, "stream": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200  # headers were sent before the fault
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "out_of_memory"
    scheduler.fault_injector = None
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_dead_engine_fails_readiness_and_asks_to_exit(real_app):
    client, app, exits = real_app
    app.state.engine.scheduler.fault_injector = faults_once("decode", WorkerCrash("worker crashed"))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "worker died" in ready.json()["reason"]
    assert client.get("/health").status_code == 503
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    deadline = time.monotonic() + 60  # the watcher stops the server so a supervisor restarts it
    while not exits and time.monotonic() < deadline:
        time.sleep(0.1)
    assert exits, "the server did not ask to exit after the engine died"
    assert "worker died" in app.state.fatal_error


def test_corrupt_adapter_in_production_exits_non_zero_with_reason(demo_checkpoint, tmp_path):
    base, lora = demo_checkpoint
    broken = tmp_path / "lora"
    shutil.copytree(lora, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00\xff" * 500)  # not a safetensors file
    env = process_env(THAI_BASE_MODEL=str(base), THAI_LORA_PATH=str(broken),
                      THAI_REQUIRE_MODEL="true", THAI_ENABLE_UI="false", THAI_HOST="127.0.0.1",
                      THAI_PORT=str(free_port()))
    out = run_module(None, [], env, timeout=180)  # python app.py
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "safetensor" in last.lower(), last
