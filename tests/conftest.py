from __future__ import annotations

import os

# One OpenMP thread in every process of the run (test workers, servers, CLIs), set before
# anything imports torch: three test workers share two cores, and a second thread per
# process only spins. On this machine the same 32 chat requests to a server took 9.5-11.1
# CPU s with two threads and 4.7-4.9 with one. Tests of thread settings set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from tests.support import ServerProcess, start_server


# A test's HTTP call without a timeout of its own waits as long as a busy machine needs:
# httpx's default (5 s to connect, read or write) failed a UI request on a 2-core machine with
# a busy loop and three test workers beside the server. A test about timeouts passes its own.
TEST_HTTP_TIMEOUT = httpx.Timeout(120.0)
for _function in (httpx.request, httpx.stream.__wrapped__, httpx.get, httpx.options, httpx.head,
                  httpx.post, httpx.put, httpx.patch, httpx.delete,
                  httpx.Client.__init__, httpx.AsyncClient.__init__):
    _function.__kwdefaults__["timeout"] = TEST_HTTP_TIMEOUT

# One TLS context for every HTTP client the tests make without a `verify` of their own. httpx
# builds a new context per client (parsing certifi's whole CA bundle: ~45 ms of CPU), and each
# module-level httpx.get() is a client: the readiness polls alone (5 a second while a server
# starts) spent a quarter of a core on certificates for plain-HTTP loopback calls.
TEST_TLS_CONTEXT = httpx.create_ssl_context()
for _function in (httpx.request, httpx.stream.__wrapped__, httpx.get, httpx.options, httpx.head,
                  httpx.post, httpx.put, httpx.patch, httpx.delete,
                  httpx.Client.__init__, httpx.AsyncClient.__init__):
    _function.__kwdefaults__["verify"] = TEST_TLS_CONTEXT
for _transport in (httpx.HTTPTransport, httpx.AsyncHTTPTransport):  # `verify` is positional there
    _transport.__init__.__defaults__ = (TEST_TLS_CONTEXT, *_transport.__init__.__defaults__[1:])


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory, worker_id) -> tuple[Path, Path]:
    """The generated Qwen2-architecture checkpoint (base + LoRA) used by real-model tests.

    Built once per run: pytest-xdist's workers share the run's base folder, and the first
    worker to take the lock builds it there (tests only read it)."""
    from filelock import FileLock

    from api.engine.demo_checkpoint import build_demo_checkpoint

    if worker_id == "master":
        return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    shared = tmp_path_factory.getbasetemp().parent / "demo"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "complete").exists():
            build_demo_checkpoint(shared)
            (shared / "complete").touch()
    return shared / "base", shared / "lora"


@pytest.fixture(scope="session")
def model_env(demo_checkpoint) -> dict[str, str]:
    base, lora = demo_checkpoint
    # float32 and no quantization whatever the CPU: the suite compares outputs token for token
    # and times streams on the tiny model; dtype auto (bf16 on CPUs with native bf16) and
    # quantization auto (w8a8 when its measured KL is small) have tests of their own.
    return {"THAI_BASE_MODEL": str(base), "THAI_LORA_PATH": str(lora), "THAI_REQUIRE_MODEL": "true",
            "THAI_DTYPE": "float32", "THAI_QUANTIZATION": "none"}


@pytest.fixture(scope="session")
def live_server(model_env, tmp_path_factory):
    """One real server process for the read-mostly API tests."""
    server: ServerProcess = start_server(model_env, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one browser-test module (closed after it)."""
    from tests.support import chromium_browser

    with chromium_browser() as launched:
        yield launched


# ------------------------------------------------------------------ parallel runs (xdist)
# pytest.ini asks for `-n auto --dist loadgroup`: a run of several test files goes to
# THAI_TEST_WORKERS worker processes (default 3 on this 2-core machine: much of the suite
# waits on servers and subprocesses); a run of one file stays in this process. The tests of
# a module that share its module-scoped servers (or a session one) are one group, so those
# start once, on one worker; a test with servers of its own is a unit any free worker takes.
# The modules below start first (longest first, so the run does not end waiting on one of
# them), and SERIAL_GROUPS keeps modules that must not run beside each other on one worker.
SLOW_FIRST = [
    "test_summarize_long.py", "test_upstream.py", "test_ui_browser_documents.py",
    "test_attack_ui.py", "test_documents.py", "test_http_limits.py", "test_attack_api.py",
    "test_openai_clients.py", "test_parse_sandbox.py", "test_batch.py", "test_schemathesis.py",
    "test_deploy_nginx_e2e.py", "test_ui_documents.py", "test_upstream_hostile.py",
    "test_client_limits.py", "test_deploy_tools.py", "test_cpu_fast_paths.py",
]
# module -> group name: these modules run on one worker, one after the other
SERIAL_GROUPS: dict[str, str] = {}


def pytest_xdist_auto_num_workers(config) -> int:
    args = [arg.split("::")[0] for arg in config.args]
    paths = {Path(arg) for arg in args}
    several = len(paths) > 1 or any(path.is_dir() for path in paths)
    return int(os.environ.get("THAI_TEST_WORKERS", "3")) if several else 0


# Shared, but cheap to have on every worker (the checkpoint is built once, under a lock).
CHEAP_SHARED_FIXTURES = {"demo_checkpoint", "model_env"}


def _shares_a_fixture(item) -> bool:
    """Whether the test uses one of our module- or session-scoped fixtures (a server, a
    browser): then it runs on the worker that has its module's."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return True
    for name, defs in info.name2fixturedefs.items():
        if name in CHEAP_SHARED_FIXTURES or not defs:
            continue
        fixture = defs[-1]
        if fixture.scope != "function" and fixture.baseid.startswith("tests"):
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept inside
    for item in items:
        if any(True for _ in item.iter_markers("xdist_group")):
            continue
        group = SERIAL_GROUPS.get(item.path.name)
        if group is None and _shares_a_fixture(item):
            group = item.path.name
        if group is not None:  # the others are units of their own, run wherever a worker is free
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_make_parametrize_id(config, val, argname):
    """A generated file's bytes (zips and PDFs carry their creation time) get a fixed id:
    every worker must collect the same test names."""
    if isinstance(val, (bytes, bytearray)) and len(val) > 64:
        return f"{argname}-bytes"
    return None
