"""The one-call GPU benchmark (bench/gpu_h100.sh, bench/gpu_wheels.py, bench/gpu_bench.py),
tested everywhere but on the GPU itself.

The GPU machine is lent to only some sessions and has no network, so whatever can go
wrong there without a GPU is caught here: the script's syntax, the wheel list (no
network), the download and its size check, the choice of which wheels to install against
a machine's own packages, an install into a CPython 3.12 with only the machine's ML stack
(faked) and imports of every runtime package from it, and the whole flow on the CPU
(``GPU_BENCH_DEVICE=cpu``: the same phases, a small model, tiny counts).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu_wheels
from bench.gpu_wheels import MACHINE, RUNTIME, SizeError, check_size, plan, read_pins

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_h100.sh"


def run_py(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, **kw)


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               files: dict[str, str] | None = None) -> Path:
    """A minimal valid wheel: its METADATA and the given files."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires), "\nA description.\n"])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", meta)
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                                 "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
        for member, text in (files or {}).items():
            zf.writestr(member, text)
    return path


MACHINE_OK = {"torch": "2.11.0", "transformers": "5.17.0", "tokenizers": "0.23.2",
              "safetensors": "0.8.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
              "numpy": "2.5.2", "jinja2": "3.1.6"}


# ---------------------------------------------------------------------- no network
def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_wheel_folder_is_ignored():
    assert subprocess.run(["git", "check-ignore", "-q", "bench/wheels-py312/x.whl"],
                          cwd=REPO).returncode == 0


def test_list_needs_no_network_and_follows_the_pins():
    pins = read_pins(REPO / "requirements.txt", REPO / "requirements-dev.txt")
    specs = gpu_wheels.requirement_specs()
    names = [s.partition("==")[0] for s in specs]
    assert set(RUNTIME) <= set(names)
    for spec in specs:
        name, _, version = spec.partition("==")
        assert version == pins.get(name, ""), spec  # pinned exactly where requirements pin
    assert not set(names) & set(MACHINE)
    assert "gradio" not in names and "pythainlp" not in names
    out = run_py("-m", "bench.gpu_wheels", "--list", env={**os.environ, "PIP_NO_INDEX": "1"})
    assert out.returncode == 0, out.stderr
    assert f"fastapi=={pins['fastapi']}" in out.stdout
    assert "not shipped: gradio" in out.stdout
    assert "from the GPU machine: torch, transformers>=5.17" in out.stdout


def test_size_check_fails_on_an_oversize_folder(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    with open(folder / "big-1.0-py3-none-any.whl", "wb") as f:
        f.truncate(3 * 2**20)  # sparse: 3 MiB that cost nothing to write
    with pytest.raises(SizeError, match="over the 2 MiB limit"):
        check_size(folder, limit_mib=2)
    assert check_size(folder, limit_mib=4) == 3 * 2**20
    out = run_py("-m", "bench.gpu_wheels", "check", "--wheels", str(folder), "--limit-mib", "2")
    assert out.returncode == 1
    assert "over the 2 MiB limit" in out.stderr and "big-1.0-py3-none-any.whl" in out.stderr


def test_check_flags_a_stale_folder(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    manifest = {"wheels": [{"name": "fastapi", "version": "0.0.1"}]}
    (folder / gpu_wheels.MANIFEST).write_text(json.dumps(manifest))
    problems = gpu_wheels.stale(folder)
    assert any(p.startswith("fastapi 0.0.1") for p in problems)
    assert any(p.startswith("uvicorn is not in") for p in problems)


def test_plan_reuses_what_fits_and_replaces_what_does_not(tmp_path):
    fake_wheel(tmp_path, "fastapi", "1.0", ("starlette>=1.0", "typing-extensions>=4.14",
                                            "pytest; extra == 'test'",
                                            "tomli; python_version < '3.0'"))
    fake_wheel(tmp_path, "starlette", "1.5", ("anyio<5,>=4",))
    fake_wheel(tmp_path, "typing-extensions", "4.16.0")
    fake_wheel(tmp_path, "anyio", "4.16.0", ("idna>=2.8",))
    fake_wheel(tmp_path, "prometheus-client", "0.26.0")
    installed = {**MACHINE_OK, "typing-extensions": "4.12.2", "anyio": "4.6.0", "idna": "3.10",
                 "prometheus-client": "0.27.0"}
    top = ["fastapi==1.0", "prometheus-client==0.26.0"]
    result = plan(tmp_path, installed, top_level=top)
    assert result["problems"] == []
    assert result["install"] == ["fastapi-1.0-py3-none-any.whl", "starlette-1.5-py3-none-any.whl",
                                 "typing_extensions-4.16.0-py3-none-any.whl"]
    # kept: fits every requirement on it (a pin counts as "at least", so newer is fine)
    assert result["reuse"]["anyio"] == "4.6.0" and result["reuse"]["prometheus-client"] == "0.27.0"
    assert "pytest" not in result["reuse"] and "tomli" not in result["reuse"]
    # older than the pin: ours goes first on the path
    result = plan(tmp_path, {**installed, "prometheus-client": "0.21.0"}, top_level=top)
    assert "prometheus_client-0.26.0-py3-none-any.whl" in result["install"]

    # a machine version that a chosen wheel rejects is replaced, with its own needs
    result = plan(tmp_path, {**installed, "anyio": "3.7.1"}, top_level=["fastapi"])
    assert "anyio" not in result["reuse"]
    assert "anyio-4.16.0-py3-none-any.whl" in result["install"]
    assert result["reuse"]["idna"] == "3.10"


def test_plan_names_what_cannot_work(tmp_path):
    fake_wheel(tmp_path, "fastapi", "1.0", ("starlette>=1.0",))
    machine = {k: v for k, v in MACHINE_OK.items() if k != "torch"}
    result = plan(tmp_path, {**machine, "transformers": "4.57.0"}, top_level=["fastapi"])
    text = "\n".join(result["problems"])
    assert "starlette: needed (>=1.0 (fastapi 1.0))" in text
    assert "torch: the GPU machine lacks it" in text
    assert "transformers: the GPU machine has 4.57.0; the benchmark needs >=5.17" in text
    fake_wheel(tmp_path, "starlette", "1.0")
    fake_wheel(tmp_path, "starlette", "1.1")
    with pytest.raises(RuntimeError, match="two wheels of starlette"):
        plan(tmp_path, MACHINE_OK, top_level=["fastapi"])


def test_unpack_without_pip_puts_purelib_on_the_path(tmp_path):
    wheel = fake_wheel(tmp_path, "demo-pkg", "1.0", files={
        "demo_pkg/__init__.py": "VALUE = 1\n",
        "demo_pkg-1.0.data/purelib/demo_extra.py": "VALUE = 2\n",
        "demo_pkg-1.0.data/scripts/demo": "#!/bin/sh\n"})
    target = tmp_path / "site"
    gpu_wheels.unpack_wheel(wheel, target)
    assert (target / "demo_pkg" / "__init__.py").exists()
    assert (target / "demo_extra.py").exists()
    assert (target / "demo_pkg-1.0.dist-info" / "METADATA").exists()
    assert not list(target.rglob("scripts"))
    out = subprocess.run([sys.executable, "-S", "-c", "import demo_pkg, demo_extra; "
                          "print(demo_pkg.VALUE + demo_extra.VALUE)"],
                         env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "3", out.stderr


def test_deadline_skips_phases_and_still_writes_results(tmp_path):
    out = run_py("-m", "bench.gpu_bench", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"), "--deadline-s", "20", timeout=120)
    assert out.returncode == 1
    results = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert results["phases"]["machine"]["status"] == "ok"
    assert results["phases"]["model"]["status"].startswith("skipped")
    assert "model: skipped" in (tmp_path / "out" / "gpu_results.md").read_text()


# ---------------------------------------------------------------------- the download
@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """The real download into a temporary folder; skipped when the index is unreachable."""
    probe = tmp_path_factory.mktemp("probe")
    pin = read_pins(REPO / "requirements.txt")["fastapi"]
    reach = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--only-binary=:all:", "-d", str(probe), f"fastapi=={pin}"],
                           capture_output=True, text=True, timeout=300)
    if reach.returncode != 0:
        pytest.skip(f"package index unreachable: {reach.stderr.strip()[-200:]}")
    folder = tmp_path_factory.mktemp("dl") / "wheels-py312"
    gpu_wheels.download(folder)
    return folder


def test_download_is_one_closure_for_cpython_312_under_the_limit(downloaded):
    manifest = json.loads((downloaded / gpu_wheels.MANIFEST).read_text())
    names = [w["name"] for w in manifest["wheels"]]
    assert len(names) == len(set(names)), "two versions of one wheel stop the install"
    assert set(RUNTIME) <= set(names)
    assert not set(names) & set(MACHINE)
    for w in manifest["wheels"]:
        tags = w["file"][:-4].split("-")[-3:]
        assert tags[0] in ("py3", "cp312", "py2.py3") or tags[1] == "abi3", w["file"]
        assert tags[2] == "any" or "x86_64" in tags[2], w["file"]
    assert manifest["total_bytes"] < gpu_wheels.LIMIT_MIB * 2**20
    assert gpu_wheels.stale(downloaded) == []
    # the plan on a machine that has everything it needs installs nothing new for the ML stack
    everything = {**MACHINE_OK, **{w["name"]: w["version"] for w in manifest["wheels"]}}
    result = plan(downloaded, everything)
    assert result["install"] == [] and result["problems"] == []


def _python312() -> str | None:
    found = shutil.which("python3.12")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))):
        return candidate
    return None


def test_install_into_a_python312_with_only_the_ml_stack(downloaded, tmp_path):
    """What gpu_h100.sh does on the GPU machine, on a bare CPython 3.12 whose torch,
    transformers, ... are faked as installed: every runtime package must then come from
    the folder, and import (the binary wheels are cp312)."""
    python = _python312()
    if python is None:
        pytest.skip("no CPython 3.12 here")
    machine = tmp_path / "machine"
    for name, version in MACHINE_OK.items():
        info = machine / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    target = tmp_path / "site"
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(machine), "PIP_NO_INDEX": "1"}
    out = subprocess.run([python, "-m", "bench.gpu_wheels", "install", "--wheels", str(downloaded),
                          "--target", str(target)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reused from this machine: accelerate 1.15.0" in out.stdout
    plan_file = json.loads((target / "GPU_WHEELS_PLAN.json").read_text())
    assert any(f.startswith("pydantic_core-") and "cp312" in f for f in plan_file["install"])
    modules = [module for module, _ in RUNTIME.values()]
    code = ("import importlib, sys; mods = sys.argv[1:]; "
            "[importlib.import_module(m) for m in mods]; "
            "print(all(sys.modules[m].__file__.startswith(%r) for m in mods))" % str(target))
    out = subprocess.run([python, "-c", code, *modules], env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


# ---------------------------------------------------------------------- the whole flow
def test_simulated_run_writes_results_and_table(tmp_path):
    """gpu_h100.sh end to end on the CPU: random model (small shape), cold start, two
    levels, the in-process baselines, the decode-step profile, the files in $OUT."""
    out_dir = tmp_path / "out"
    env = {**os.environ, "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_DEVICE": "cpu",
           "GPU_BENCH_INSTALL": "0", "GPU_BENCH_WORK": str(tmp_path / "work"),
           "OUT": str(out_dir), "GPU_BENCH_DEADLINE_S": "400"}
    proc = subprocess.run(["bash", str(SCRIPT), "--shape", "small", "--threads", "1",
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
    assert len(list(out_dir.iterdir())) <= 8  # the device tool brings back at most 8 files
    assert "| ours | 1 |" in log  # the table is printed too
