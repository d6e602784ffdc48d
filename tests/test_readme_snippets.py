"""Every curl and Python snippet in README.md and docs/api.md runs as written against a real
server (only the address changes: localhost:8001 becomes the test server's).

Shell blocks that set up rather than call the server (``make ...``, ``export ...``) are
named here and covered elsewhere (tests/test_make_install.py, tests/test_settings.py); a
new kind of block fails until it is run or named.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support import REPO

DOCS = ("README.md", "docs/api.md")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.S | re.M)
SETUP = re.compile(r"^(make |export |\./manage\.sh )")


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for name in DOCS:
        text = (REPO / name).read_text(encoding="utf-8")
        found += [(name, body) for lang, body in BLOCK.findall(text) if lang == kind]
    return found


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines and open quotes joined, comments dropped."""
    found, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not current:
            line = line.split(" # ")[0]
        current = f"{current}\n{line}" if current else line
        if current.endswith("\\"):  # bash joins it with the next line
            continue
        if current.count("'") % 2:  # inside a quoted (JSON) argument
            continue
        found.append(current.strip())
        current = ""
    return found


def here(text: str, url: str) -> str:
    return text.replace("http://localhost:8001", url)


def curl_commands() -> list[tuple[str, str]]:
    found = []
    for name, body in blocks("bash"):
        for command in commands(body):
            if command.startswith("curl "):
                found.append((name, command))
            else:
                assert SETUP.match(command), f"{name}: a shell line no test runs: {command}"
    return found


def test_the_docs_have_snippets_to_run():
    assert len(curl_commands()) >= 4 and len(blocks("python")) >= 3


@pytest.mark.parametrize("name,command", curl_commands(),
                         ids=lambda value: value if value in DOCS else None)
def test_curl_snippet_runs_as_written(live_server, name, command):
    result = subprocess.run(["bash", "-c", here(command, live_server.url)], capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"{name}: {command}\n{result.stderr}"
    output = result.stdout
    if '"stream": true' in command:
        assert output.rstrip().endswith("data: [DONE]"), output[-500:]
        assert '"error"' not in output
    else:
        body = json.loads(output)
        assert "error" not in body, body
        assert body.get("choices") or body.get("summary"), body


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs_as_written(live_server, index):
    name, code = blocks("python")[index]
    assert "localhost:8001" in code, f"{name}: the snippet should talk to the server"
    result = subprocess.run([sys.executable, "-c", here(code, live_server.url)], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{name}:\n{code}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{name}: the snippet printed nothing"
