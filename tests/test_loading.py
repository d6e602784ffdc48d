"""Start-up: background loading, the seed's missing-model message, demo fallback."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import httpx

from tests.support import free_port, process_env, run_module, start_server


@contextmanager
def unanswered_hub():
    """An HF_ENDPOINT whose TCP connects hang until the block ends: a listener with a full
    accept queue (backlog 0 and one connection never accepted), so Linux drops the next
    SYNs; when the listener closes, the next retried SYN is refused at once. The server's
    background load stays in its hub check exactly as long as the test needs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(2):  # what the accept queue takes, whatever the kernel counts
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        for sock in (listener, *fillers):
            sock.close()


def test_health_reports_loading_then_ready(demo_checkpoint, tmp_path):
    """While the model loads (held in its hub check), /health says loading and generation is
    a 503 with Retry-After, not a hang; then ready, and never back. States, not timings."""
    demo_dir = demo_checkpoint[0].parent
    with unanswered_hub() as endpoint:
        env = {"THAI_BASE_MODEL": "someone/not-in-any-cache", "THAI_LORA_PATH": "",
               "THAI_REQUIRE_MODEL": "false", "THAI_DEMO_DIR": str(demo_dir),
               "THAI_HUB_TIMEOUT_S": "60", "THAI_DTYPE": "float32", "THAI_QUANTIZATION": "none",
               "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
        server = start_server(env, tmp_path, wait_ready=False)
        try:
            seen = []
            for _ in range(3):
                r = httpx.get(server.url + "/health", timeout=30)
                seen.append((r.status_code, r.json()["status"], r.json()["model_loaded"]))
            chat = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 4})
            assert chat.status_code == 503 and chat.headers.get("retry-after"), chat.text
            assert seen == [(503, "loading", False)] * 3
        except BaseException:
            server.stop()
            raise
    try:
        deadline = time.monotonic() + 300
        while seen[-1][0] != 200:
            assert time.monotonic() < deadline, seen[-5:]
            time.sleep(0.1)
            r = httpx.get(server.url + "/health", timeout=30)
            seen.append((r.status_code, r.json()["status"], r.json()["model_loaded"]))
        first_ready = seen.index((200, "ok", True))
        assert set(seen[:first_ready]) == {(503, "loading", False)}, seen
        assert httpx.get(server.url + "/health", timeout=30).json()["demo"] is True
    finally:
        server.stop()


def test_missing_adapter_in_production_exits_with_seed_message(model_env, tmp_path):
    env = process_env(**{**model_env, "THAI_LORA_PATH": str(tmp_path / "nope"),
                         "THAI_REQUIRE_MODEL": "true", "THAI_HOST": "127.0.0.1",
                         "THAI_PORT": str(free_port())})
    out = run_module(None, [], env, timeout=120)  # python app.py
    assert out.returncode == 1
    assert f"Thai model not found at {tmp_path / 'nope'}" in out.stderr
    assert "adapter_config.json" in out.stderr and "adapter_model.safetensors" in out.stderr


def test_offline_hub_model_falls_back_to_demo(demo_checkpoint, tmp_path):
    # The run's demo checkpoint (a missing one is built: test_fresh_clone's `make run`), and a
    # quantized-weight cache of its own, so that every run measures and quantizes alike.
    env = {"THAI_BASE_MODEL": "Qwen/Qwen2.5-1.5B-Instruct", "THAI_LORA_PATH": str(tmp_path / "missing"),
           "THAI_REQUIRE_MODEL": "false", "THAI_DEMO_DIR": str(demo_checkpoint[0].parent),
           "THAI_QUANT_CACHE_DIR": str(tmp_path / "quant-cache"), "HF_HOME": str(tmp_path / "hf")}
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
