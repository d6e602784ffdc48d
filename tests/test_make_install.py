"""The Makefile's install steps, run for real with a stand-in interpreter that records its calls.

`make install` is what `make run` needs (requirements.txt), `make install-dev` adds the test
stack, and a different TORCH_SPEC/TORCH_INDEX after a first install replaces torch instead of
answering "Nothing to be done" and keeping the CPU build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CUDA = ["TORCH_SPEC=torch==2.13.0", "TORCH_INDEX=--index-url https://download.pytorch.org/whl/cu128"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "requirements-dev-nodeps.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/../calls"\n')
    python.chmod(0o755)
    return tmp_path


def make(project: Path, *args: str) -> list[str]:
    """Run make; return the interpreter calls it made."""
    calls = project / ".venv" / "calls"
    calls.unlink(missing_ok=True)
    subprocess.run(["make", "-C", str(project), *args], check=True, capture_output=True, text=True)
    return calls.read_text().splitlines() if calls.exists() else []


def test_run_installs_only_the_serving_requirements(project):
    calls = make(project, "install")
    assert any("-r requirements.txt" in call for call in calls)
    assert not any("requirements-dev.txt" in call for call in calls)
    assert make(project, "install") == []  # installed: nothing to do
    calls = make(project, "install-dev")
    assert calls == ["-m pip install --quiet -r requirements-dev.txt",
                     "-m pip install --quiet --no-deps -r requirements-dev-nodeps.txt"]


def test_a_new_torch_spec_replaces_torch(project):
    make(project, "install")
    calls = make(project, *CUDA, "install")
    forced = [call for call in calls if "--force-reinstall" in call]
    assert forced == ["-m pip install --quiet --force-reinstall --no-deps torch==2.13.0 "
                      "--index-url https://download.pytorch.org/whl/cu128"]
    assert any("-r requirements.txt" in call for call in calls)
    assert make(project, *CUDA, "install") == []
    # and back to the default CPU build
    assert any("--force-reinstall" in call for call in make(project, "install"))
