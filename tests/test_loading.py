"""Start-up: background loading, the seed's missing-model message, demo fallback."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.support import REPO, free_port, start_server


def test_health_reports_loading_then_ready(model_env, tmp_path):
    server = start_server(model_env, tmp_path, wait_ready=False)
    try:
        seen = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = httpx.get(server.url + "/health")
            seen.append((r.status_code, r.json()["status"], r.json()["model_loaded"]))
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert seen[0] == (503, "loading", False)
        assert seen[-1] == (200, "ok", True)
        # requests during load get 503, not a hang
    finally:
        server.stop()


def test_missing_adapter_in_production_exits_with_seed_message(model_env, tmp_path):
    env = {**model_env, "THAI_LORA_PATH": str(tmp_path / "nope"), "THAI_REQUIRE_MODEL": "true",
           "THAI_HOST": "127.0.0.1", "THAI_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "app.py"], cwd=REPO, env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"Thai model not found at {tmp_path / 'nope'}" in out.stderr
    assert "adapter_config.json" in out.stderr and "adapter_model.safetensors" in out.stderr


def test_offline_hub_model_falls_back_to_demo(tmp_path):
    env = {"THAI_BASE_MODEL": "Qwen/Qwen2.5-1.5B-Instruct", "THAI_LORA_PATH": str(tmp_path / "missing"),
           "THAI_REQUIRE_MODEL": "false", "THAI_DEMO_DIR": str(tmp_path / "demo"), "HF_HOME": str(tmp_path / "hf")}
    server = start_server(env, tmp_path, timeout=300)  # no hub retries: ready, not hung
    try:
        health = httpx.get(server.url + "/health").json()
        assert health["demo"] is True and health["model_loaded"] is True
        models = httpx.get(server.url + "/v1/models").json()
        assert models["data"][0]["demo"] is True
        log = server.log()
        assert "FALLING BACK TO THE DEMO CHECKPOINT" in log
        assert "Thai model not found at" in log
    finally:
        server.stop()
