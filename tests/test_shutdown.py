"""SIGTERM to a real server with streams in flight: every stream completes, new work gets
503 while draining, readiness fails but liveness holds, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.support import start_server

STREAMS = 4
TOKENS = 300


def read_stream(url: str, index: int, results: dict, started: threading.Event) -> None:
    body = {"messages": [{"role": "user", "content": f"เล่าเรื่องที่ {index}"}], "stream": True,
            "max_tokens": TOKENS, "min_tokens": TOKENS, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    text, finish, usage, done = [], None, None, False
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
                    if text[-1]:
                        started.set()
        results[index] = {"status": response.status_code, "finish": finish, "done": done,
                          "tokens": usage and usage["completion_tokens"], "chars": len("".join(text))}
    except Exception as exc:  # recorded, so the assertion names what went wrong
        results[index] = {"error": repr(exc)}


def test_sigterm_drains_streams_then_exits_zero(model_env, tmp_path):
    env = {**model_env, "THAI_ENABLE_UI": "false", "THAI_DRAIN_TIMEOUT_S": "120",
           "THAI_MAX_BATCH_SIZE": str(STREAMS)}
    server = start_server(env, tmp_path)
    results: dict[int, dict] = {}
    events = [threading.Event() for _ in range(STREAMS)]
    threads = [threading.Thread(target=read_stream, args=(server.url, i, results, events[i]))
               for i in range(STREAMS)]
    try:
        for thread in threads:
            thread.start()
        assert all(e.wait(60) for e in events), "streams did not start"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        during = httpx.post(server.url + "/v1/chat/completions", timeout=10, json={
            "messages": [{"role": "user", "content": "ใหม่"}], "max_tokens": 4})
        ready = httpx.get(server.url + "/ready", timeout=10)
        live = httpx.get(server.url + "/health", timeout=10)
        still_streaming = sum(t.is_alive() for t in threads)
        for thread in threads:
            thread.join(120)
        code = server.proc.wait(60)
    finally:
        server.stop(signal.SIGKILL)

    assert still_streaming > 0, "the streams ended before the drain could be observed"
    assert during.status_code == 503 and during.json()["error"]["code"] == "server_shutting_down"
    assert during.headers["Retry-After"].isdigit()
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert live.status_code == 200
    completed = [r for r in results.values() if r.get("done") and r.get("finish") == "length"
                 and r.get("tokens") == TOKENS and r.get("status") == 200]
    print(f"SIGTERM drain: {len(completed)}/{STREAMS} streams completed, exit code {code}")
    assert len(completed) == STREAMS, results
    assert code == 0, server.log()[-3000:]
    log = server.log()
    assert "draining" in log and "drain complete" in log
