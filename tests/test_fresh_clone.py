"""The README's quick start from a fresh clone: `make run` serves (demo fallback offline).

`make test` from a fresh clone is what CI runs (`.ci/run`). Here the clone reuses this
checkout's virtual environment (VENV=...) so the test does not reinstall everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.support import REPO, free_port


def test_make_run_from_fresh_clone(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("no commit to clone yet")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    venv = os.environ.get("VIRTUAL_ENV") or str(REPO / ".venv")
    port = free_port()
    env = {**os.environ, "THAI_HOST": "127.0.0.1", "THAI_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    log = open(tmp_path / "make-run.log", "wb")
    proc = subprocess.Popen(["make", "run", f"VENV={venv}"], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if r.status_code == 200:
                    health = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert health is not None, (tmp_path / "make-run.log").read_text()
        assert health["demo"] is True
        r = httpx.post(f"http://127.0.0.1:{port}/v1/summarize", json={"text": "ข้อความภาษาไทยที่ต้องการสรุป",
                                                                      "max_tokens": 10}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] >= 1
        assert (clone / "models" / "demo" / "lora" / "adapter_config.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
