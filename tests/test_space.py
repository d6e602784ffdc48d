"""A Hugging Face Space works as pushed: the repository's own files are enough.

A Space reads README.md's front matter (sdk, sdk_version, app_file), installs
pre-requirements.txt and then requirements.txt, and runs ``python app.py`` with
GRADIO_SERVER_PORT set. The fast tests check those files agree with each other and with
the Makefile; the ``full`` test installs requirements.txt alone into a clean virtual
environment (no system site-packages; this machine's own package index stands in for
PyPI, and download.pytorch.org, unreachable here, is left out) and starts the app the way
a Space does, from a copy of the repository's files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import REPO, free_port

PIN = re.compile(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;#]+)")


def front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "a Space reads its settings from README.md's front matter"
    return yaml.safe_load(text.split("---\n")[1])


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match:
            found[match.group(1).split("[")[0].lower()] = match.group(2)
    return found


def test_readme_front_matter_names_the_app_and_the_gradio_version():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert (REPO / meta["app_file"]).is_file()
    assert str(meta["sdk_version"]) == pins(REPO / "requirements.txt")["gradio"]
    assert str(meta["python_version"]).startswith("3.")


def test_requirements_carry_torch_for_a_space_with_the_cpu_build_first():
    requirements = pins(REPO / "requirements.txt")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", makefile, re.M).group(1)
    assert requirements["torch"] == torch_spec, "the Space and `make run` get the same torch"
    pre = (REPO / "pre-requirements.txt").read_text(encoding="utf-8").splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pre
    assert pins(REPO / "pre-requirements.txt") == {"torch": torch_spec}
    # every other line of requirements.txt is pinned: a Space build is reproducible
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        assert not line or PIN.match(line), f"unpinned requirement: {line}"
    # nothing but the Space reads pre-requirements.txt (local installs keep TORCH_SPEC)
    assert "pre-requirements" not in makefile


def repository_copy(target: Path) -> Path:
    """The files a push would send: tracked and not ignored (untracked new files included)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the install alone took 10 minutes on a busy 2-core machine
def test_a_clean_venv_from_the_requirements_starts_the_space(tmp_path, demo_checkpoint):
    space = repository_copy(tmp_path / "space")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile",
                                "-r", "requirements.txt"], cwd=space, capture_output=True,
                               text=True, timeout=1500)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", "import sys, torch, gradio; "
                            "print(sys.prefix, torch.__version__, gradio.__version__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0 and str(venv) in probe.stdout, probe.stderr

    port = free_port()
    base, lora = demo_checkpoint
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THAI_", "VIRTUAL_ENV"))}
    env.update({"SPACE_ID": "someone/thai-llm", "GRADIO_SERVER_PORT": str(port),
                "THAI_HOST": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                "THAI_BASE_MODEL": str(base), "THAI_LORA_PATH": str(lora)})
    log = tmp_path / "space.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(python), "app.py"], cwd=space, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health is not None and health.status_code == 200, log.read_text()[-3000:]
        assert health.json()["model"]
        page = httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        process.terminate()
        process.wait(60)
