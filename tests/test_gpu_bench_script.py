"""The GPU benchmark for an offline GPU host (bench/gpu_offline.sh, bench/gpu_bench.py),
tested without a GPU and without network: the script's syntax and the commands of each step
(wheels downloaded for the host's Python and platform, installed with --no-index from the
wheelhouse only), a real offline install from a local wheelhouse, the benchmark's help, and
the whole benchmark flow on the CPU (``--device cpu``: the same phases, a small model, tiny
counts; in ``make test-full``), with the expectation line it prints last.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu_bench import verdict

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_offline.sh"


def run_py(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, **kw)


def script(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^\s#]+)", line)
        if m:
            found[m.group(1).split("[")[0].lower()] = m.group(2)
    return found


# ---------------------------------------------------------------------- no network
def test_script_syntax_and_help():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = script("--help")
    assert out.returncode == 0 and "bench/gpu_offline.sh download" in out.stdout
    assert script("nonsense").returncode != 0
    helped = run_py("-m", "bench.gpu_bench", "--help")
    assert helped.returncode == 0 and "--concurrency" in helped.stdout


def test_plan_downloads_for_the_host_and_installs_offline():
    out = script("plan", "--concurrency", "1,32",
                 env={"PYTHON_VERSION": "3.11", "PLATFORM": "manylinux_2_28_aarch64",
                      "TORCH_SPEC": "torch==9.9.9", "TORCH_INDEX": "https://example.invalid/cu999"})
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    download = next(line for line in lines if " pip download " in line)
    for part in ("--python-version 3.11", "--platform manylinux_2_28_aarch64",
                 "--only-binary=:all:", "--extra-index-url https://example.invalid/cu999",
                 "-r bench/requirements-gpu.txt", "torch==9.9.9", "--dest wheelhouse"):
        assert part in download, part
    build = next(line for line in lines if " pip wheel " in line)
    grapheme = pins(REPO / "requirements.txt")["grapheme"]
    assert f"grapheme=={grapheme}" in build and "--no-deps" in build
    install = next(line for line in lines if " pip install " in line)
    assert "--no-index --find-links wheelhouse" in install and "torch==9.9.9" in install
    assert lines.index(build) < lines.index(download) < lines.index(install)
    assert lines[-1].endswith("-m bench.gpu_bench --out bench/out/gpu --concurrency 1,32")


def test_gpu_requirements_follow_the_pins():
    gpu = (REPO / "bench" / "requirements-gpu.txt").read_text()
    assert "-r ../requirements.txt" in gpu
    dev = pins(REPO / "requirements-dev.txt")
    for name, version in pins(REPO / "bench" / "requirements-gpu.txt").items():
        assert dev.get(name) == version, name


def test_wheelhouse_and_venv_are_ignored():
    for path in ("wheelhouse/x.whl", ".venv-gpu/bin/python"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                                 "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
        zf.writestr(f"{name.replace('-', '_')}.py", f"VALUE = {version.split('.')[0]!r}\n")
    return path


def test_install_uses_the_wheelhouse_only(tmp_path):
    """The install step for real, with no index: a virtual environment gets exactly what
    the wheelhouse holds (stand-ins for the requirements and torch)."""
    house = tmp_path / "house"
    house.mkdir()
    fake_wheel(house, "demo-req", "1.0")
    fake_wheel(house, "demo-torch", "2.0")
    (tmp_path / "req.txt").write_text("demo-req==1.0\n")
    env = {"WHEELHOUSE": str(house), "VENV": str(tmp_path / "venv"), "PYTHON": sys.executable,
           "REQUIREMENTS": str(tmp_path / "req.txt"), "TORCH_SPEC": "demo-torch==2.0",
           "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = script("install", env=env, timeout=300)
    # the last check imports torch, which the stand-in is not: the wheels are what count here
    assert "--no-index --find-links" in out.stdout
    venv_python = tmp_path / "venv" / "bin" / "python"
    got = subprocess.run([str(venv_python), "-c", "import demo_req, demo_torch; "
                          "print(demo_req.VALUE, demo_torch.VALUE)"], capture_output=True, text=True)
    assert got.stdout.split() == ["1", "2"], out.stdout + out.stderr + got.stderr


def test_verdict_says_met_not_met_and_not_measured():
    row = {"system": "ours", "concurrency": 32, "requests_per_s": 23.5, "errors": 0}
    gpu = {"meta": {"gpu": "NVIDIA H100 80GB HBM3"}, "output_tokens": 150, "http": [row]}
    assert "MET, measured 23.5 requests/s on NVIDIA H100" in verdict(gpu)
    slow = {**gpu, "http": [{**row, "requests_per_s": 12.0}]}
    assert "NOT MET" in verdict(slow)
    assert "NOT MEASURED" in verdict({**gpu, "http": []})
    assert "not applicable" in verdict({**gpu, "meta": {"device": "cpu"}})
    assert ">= 20 requests/s at concurrency 32, 150-token replies" in verdict(gpu)


def test_deadline_skips_phases_and_still_writes_results(tmp_path):
    out = run_py("-m", "bench.gpu_bench", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"), "--deadline-s", "20", timeout=120)
    assert out.returncode == 1
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert results["phases"]["machine"]["status"] == "ok"
    assert results["phases"]["model"]["status"].startswith("skipped")
    assert "model: skipped" in (tmp_path / "out" / "gpu_results.md").read_text()


# ---------------------------------------------------------------------- the whole flow
@pytest.mark.slow  # minutes on a 2-core machine: make test-full
def test_simulated_run_writes_results_and_table(tmp_path):
    """``gpu_offline.sh run`` end to end on the CPU: random model (small shape), cold start,
    two levels, the in-process baselines, the decode-step profile, the result files."""
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "VENV": str(tmp_path / "no-venv"),
           "OUT": str(out_dir)}
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--device", "cpu", "--work",
                           str(tmp_path / "work"), "--deadline-s", "400", "--shape", "small",
                           "--threads", "1",
                           "--concurrency", "1,4", "--tokens", "8", "--rounds", "1",
                           "--min-requests", "2", "--profile-batch", "4", "--profile-warmup", "2",
                           "--profile-steps", "3", "--trace-steps", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    results = json.loads((out_dir / "gpu_results.json").read_text())
    assert {k: v["status"] for k, v in results["phases"].items()} == {
        "machine": "ok", "model": "ok", "http": "ok", "profile": "ok"}, results["errors"]
    rows = {r["concurrency"]: r for r in results["http"]}
    assert sorted(rows) == [1, 4]
    assert all(r["errors"] == 0 and r["mean_tokens_per_request"] == 8 for r in rows.values())
    assert results["cold_start_s"] > 0
    assert results["cold_start_definition"] == "process start to the first 200 from /ready"
    assert results["inprocess"]["single"]["output_tokens_per_s"] > 0
    assert "4" in results["inprocess"]["static"]
    prof = results["profile"]
    assert prof["batch"] == 4 and prof["steps_timed"] == 3 and prof["step_ms_p50"] > 0
    assert prof["split_forward_ms"] > 0 and prof["top_ops"]
    table = (out_dir / "gpu_results.md").read_text()
    assert "| ours | 4 |" in table and "Cold start (process start to /ready 200)" in table
    assert "One decode step at batch 4" in table
    for name in ("gpu_bench.log", "server.log", "decode_profile.txt", "gpu_results.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert "| ours | 1 |" in log  # the table is printed too
    assert "expectation: >= 20 requests/s at concurrency 32" in log.splitlines()[-1]
