"""The public UI attacked as an outsider would, over HTTP, against real servers.

Servers run with API keys set; the UI is public on one and protected
(``THAI_PROTECT_UI``) on the other. Every Gradio function listed in
``/ui/config`` is called, anonymously and with a key, with file payloads that
point at ``/etc/passwd``, ``/proc/self/environ`` (which holds the API keys) and
the adapter's weights; then every path any answer names is fetched through
``file=``. Also: Gradio's own routes (monitoring, profiling, proxies), CORS on
``/ui``, uploads (no length, over the limit, over the quota, paths in answers,
clean-up), per-client rate limits, the cost of the live counters under
anonymous load, nesting, ``X-Forwarded-Host`` and internal error text.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import idle_engine, start_server

KEY = "ui-attack-key-" + "0123456789abcdef"
UI = "/ui/gradio_api"
TARGETS = ("/etc/passwd", "/proc/self/environ")
FILE_META = {"_type": "gradio.FileData"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"analyst:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def adapter_file(model_env) -> Path:
    return Path(model_env["THAI_LORA_PATH"]) / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def upload_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-uploads")


@pytest.fixture(scope="module")
def public_ui(model_env, tmp_path_factory, upload_root):
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_UI_UPLOAD_DIR": str(upload_root),
           # The enumeration below makes a few hundred calls: not what this test measures.
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "100000", "THAI_UI_RATE_LIMIT_BURST": "100000",
           "THAI_UI_UPLOAD_QUOTA_BYTES": "300000", "THAI_MAX_REQUEST_BYTES": "200000",
           # uploads are files: their limit is the document one (plus 64 KiB of form)
           "THAI_DOCUMENT_MAX_BYTES": "150000"}
    server = start_server(env, tmp_path_factory.mktemp("public-ui"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def protected_ui(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_PROTECT_UI": "true",
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "100000", "THAI_UI_RATE_LIMIT_BURST": "100000"}
    server = start_server(env, tmp_path_factory.mktemp("protected-ui"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default_ui(model_env, tmp_path_factory):
    """Default limits (the UI rate limit and the 2 MiB body limit), keys for the API only."""
    server = start_server({**model_env, "THAI_API_KEYS": KEY}, tmp_path_factory.mktemp("default-ui"))
    yield server
    server.stop()


# ------------------------------------------------------------------ helpers
def history_with(path: str) -> list[dict]:
    """A chat history whose first message is a file: what the ChatInterface helpers take."""
    return [{"role": "user", "content": [{"type": "file", "file": {"path": path, "meta": FILE_META}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def payload_for(component: dict, path: str):
    if component.get("type") in ("chatbot", "state", "json", "browserstate", "dataset"):
        return history_with(path)
    return {"path": path, "meta": FILE_META, "orig_name": "x.txt"}


def call_function(url: str, fn: dict, data: list, headers: dict) -> str:
    """Call one function the way the page does; the whole answer as text."""
    session = uuid.uuid4().hex
    body = {"fn_index": fn["id"], "data": data, "session_hash": session, "event_data": None,
            "trigger_id": None}
    if not fn.get("queue"):
        r = httpx.post(f"{url}{UI}/run/predict", json=body, headers=headers, timeout=30)
        return f"{r.status_code} {r.text}"
    r = httpx.post(f"{url}{UI}/queue/join", json=body, headers=headers, timeout=30)
    if r.status_code != 200:
        return f"{r.status_code} {r.text}"
    out = [r.text]
    deadline = time.monotonic() + 20
    with httpx.stream("GET", f"{url}{UI}/queue/data", params={"session_hash": session},
                      headers=headers, timeout=20) as stream:
        for line in stream.iter_lines():
            out.append(line)
            if "process_completed" in line or time.monotonic() > deadline:
                break
    return "\n".join(out)


def secrets_in(text: str, adapter_head: bytes) -> list[str]:
    found = []
    for marker in ("root:x:0:0", "root:", "THAI_API_KEYS", KEY, "PATH=/"):
        if marker in text:
            found.append(marker)
    if adapter_head.decode("latin-1") in text:
        found.append("adapter bytes")
    return found


def enumerate_and_attack(server, headers: dict, adapter_file: Path) -> tuple[int, list[str]]:
    config = httpx.get(server.url + "/ui/config", headers=headers, timeout=30).json()
    components = {c["id"]: c for c in config["components"]}
    functions = [d for d in config["dependencies"]]
    assert len(functions) >= 30, "the chat tab registers its helper functions"
    adapter_head = adapter_file.read_bytes()[8:40]
    answers, calls = [], 0
    for fn in functions:
        for target in (*TARGETS, str(adapter_file)):
            data = [payload_for(components.get(i, {}), target) for i in fn["inputs"]]
            answers.append(call_function(server.url, fn, data, headers))
            calls += 1
    leaks = []
    for answer in answers:
        leaks += secrets_in(answer, adapter_head)
    # Every path or file= URL any answer names, and the targets themselves, fetched.
    named = set()
    for answer in answers:
        named.update(re.findall(r'"path":\s*"([^"]+)"', answer))
        named.update(re.findall(r"file=([^\"'\s]+)", answer))
    for path in named | {*TARGETS, str(adapter_file)}:
        r = httpx.get(f"{server.url}{UI}/file={path}", headers=headers, timeout=30)
        leaks += [f"{path}: {m}" for m in secrets_in(r.text, adapter_head)]
        if path in (*TARGETS, str(adapter_file)):
            assert r.status_code == 404, (path, r.status_code)
    return calls, leaks


# ------------------------------------------------------- 1. arbitrary file read
def test_the_reported_exploit_is_refused(public_ui):
    """The reported requests: pop-last-message helper with /proc/self/environ, then file=."""
    config = httpx.get(public_ui.url + "/ui/config").json()
    pop = next(d for d in config["dependencies"] if d["api_name"] == "_pop_last_user_message_1")
    r = httpx.post(f"{public_ui.url}{UI}/run/predict", json={
        "fn_index": pop["id"], "session_hash": "abc", "data": [history_with("/proc/self/environ")]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_allowed"
    assert "THAI_API_KEYS" not in r.text and "/tmp/" not in r.text
    assert httpx.get(f"{public_ui.url}{UI}/file=/proc/self/environ").status_code == 404


def test_no_function_reads_server_files_anonymously(public_ui, adapter_file):
    calls, leaks = enumerate_and_attack(public_ui, {}, adapter_file)
    assert calls >= 90 and leaks == []


def test_no_function_reads_server_files_with_a_key(protected_ui, adapter_file):
    assert httpx.get(protected_ui.url + "/ui/config").status_code == 401
    assert httpx.post(f"{protected_ui.url}{UI}/run/predict", json={"fn_index": 0, "data": []}).status_code == 401
    calls, leaks = enumerate_and_attack(protected_ui, basic(KEY), adapter_file)
    assert calls >= 90 and leaks == []


def test_gradio_file_check_itself_is_on_for_the_mounted_app():
    """Pins the Gradio 6.31 bug our mount works around: the check is skipped until has_launched."""
    from fastapi.testclient import TestClient
    from starlette.routing import Mount

    from api.server import create_app
    from api.settings import Settings
    from tests.fakes import FakeEngine

    app = create_app(Settings.from_overrides({}), FakeEngine())
    mount = next(r for r in app.router.routes if isinstance(r, Mount) and r.path == "/ui")
    gradio_app = mount.app.app  # behind the guard: Gradio's own check must hold too
    blocks = gradio_app.get_blocks()
    assert blocks.has_launched is True
    mount.app = gradio_app
    pop = next(i for i, fn in blocks.fns.items() if fn.api_name == "_pop_last_user_message_1")
    with TestClient(app) as client:
        r = client.post(f"{UI}/run/predict", json={
            "fn_index": pop, "session_hash": "s", "data": [history_with("/etc/passwd")]})
        assert r.status_code != 200 and "root:" not in r.text
        blocks.has_launched = False  # what gr.mount_gradio_app leaves: the hole
        r = client.post(f"{UI}/run/predict", json={
            "fn_index": pop, "session_hash": "s", "data": [history_with("/etc/passwd")]})
        assert r.status_code == 200 and '"path"' in r.text, "Gradio fixed it: the workaround can go"


def test_only_the_public_api_is_callable_by_name(public_ui):
    for name in ("_pop_last_user_message_1", "stats_markdown", "refresh_status", "lambda"):
        for route in ("call", "call/v2", "run", "api"):
            r = httpx.post(f"{public_ui.url}{UI}/{route}/{name}", json={"data": []})
            assert r.status_code == 404, (route, name, r.status_code)
    r = httpx.post(f"{public_ui.url}{UI}/queue/join", json={"fn_index": 10_000, "data": [],
                                                           "session_hash": "x"})
    assert r.status_code == 404
    # Queued functions go through the queue, never the direct route.
    config = httpx.get(public_ui.url + "/ui/config").json()
    summarize = next(d for d in config["dependencies"] if d["api_name"] == "summarize")
    r = httpx.post(f"{public_ui.url}{UI}/run/predict", json={
        "fn_index": summarize["id"], "data": ["ข่าว", 4, 0.0], "session_hash": "x"})
    assert r.status_code == 404


@pytest.mark.parametrize("path", ["/ui/monitoring", "/ui/monitoring/summary", f"{UI}/token",
                                  f"{UI}/profiling/summary", f"{UI}/run-history/records",
                                  f"{UI}/proxy=https://example.org/x", f"{UI}/dev/reload",
                                  f"{UI}/vibe-code", f"{UI}/user", f"{UI}/openapi.json",
                                  f"{UI}/file=/etc/passwd", f"{UI}/file=upload/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                                  f"{UI}/file/etc/passwd", f"{UI}/file=https://example.org/",
                                  f"{UI}/file=upload/" + "a" * 5000])
def test_gradio_internal_routes_are_closed(public_ui, path):
    r = httpx.get(public_ui.url + path)
    assert r.status_code == 404 and "root:" not in r.text


def test_remote_urls_are_never_fetched(public_ui):
    config = httpx.get(public_ui.url + "/ui/config").json()
    pop = next(d for d in config["dependencies"] if d["api_name"] == "_pop_last_user_message_1")
    r = httpx.post(f"{public_ui.url}{UI}/run/predict", json={
        "fn_index": pop["id"], "session_hash": "s", "data": [history_with("http://127.0.0.1:1/x")]})
    assert r.status_code == 400


# --------------------------------------------------------------------- 2. CORS
@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
def test_ui_cors_is_off_unless_configured(public_ui, origin):
    headers = {"Origin": origin, "Host": "thai.example.org"}
    r = httpx.get(public_ui.url + "/ui/config", headers=headers)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
    pre = httpx.options(f"{public_ui.url}{UI}/queue/join", headers={
        **headers, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_ui_cors_follows_the_setting():
    from fastapi.testclient import TestClient

    from api.server import create_app
    from api.settings import Settings
    from tests.fakes import FakeEngine

    allowed = "https://portal.example.org"
    app = create_app(Settings.from_overrides({"cors_origins": allowed}), FakeEngine())
    with TestClient(app, base_url="http://thai.example.org") as client:
        ok = client.get("/ui/config", headers={"Origin": allowed})
        assert ok.headers["access-control-allow-origin"] == allowed
        for origin in ("https://evil.example", "null"):
            r = client.get("/ui/config", headers={"Origin": origin})
            assert "access-control-allow-origin" not in r.headers


# ------------------------------------------------------- 3. anonymous cost
def test_ui_calls_are_rate_limited_per_client(default_ui):
    # From its own address (127.0.0.2), so the other tests' budget is untouched. The default
    # bucket holds 60 calls and refills 5 a second: calls go 8 at a time until one is refused,
    # and what passed is checked against what the bucket can have held by then, however long
    # the calls took on this machine.
    burst, per_second = 60, 300 / 60
    client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60)

    def call(_) -> httpx.Response:
        return client.post(f"{default_ui.url}{UI}/run/predict",
                           json={"fn_index": 0, "data": [], "session_hash": "rl"})

    passed, refused = 0, []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while not refused and passed < 5000:
            answers = list(pool.map(call, range(8)))
            assert {r.status_code for r in answers} <= {200, 429}, [r.text for r in answers]
            passed += sum(r.status_code == 200 for r in answers)
            refused = [r for r in answers if r.status_code == 429]
    elapsed = time.monotonic() - started
    assert refused, "no call was refused"
    assert burst <= passed <= burst + per_second * elapsed + 1, (passed, elapsed)
    assert int(refused[0].headers["Retry-After"]) >= 1
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    # Page loads are not calls, and other clients have their own budget.
    assert client.get(default_ui.url + "/ui/").status_code == 200
    assert httpx.post(f"{default_ui.url}{UI}/run/predict", timeout=60, json={
        "fn_index": 0, "data": [], "session_hash": "other"}).status_code == 200


def test_counters_under_anonymous_load_do_not_starve_generation(default_ui):
    """Anonymous texts to the live counters (three of the largest a request may hold, three
    just under the 2 MiB body limit), queued at once, against one authenticated chat request
    sent as the first starts: the counters run one at a time (never two in progress, in the
    order one event stream reports them) and hold no engine row, so the chat has the engine
    to itself and all its tokens. Order and queue state, not latency: times on a loaded
    machine are noise."""
    url = default_ui.url
    config = httpx.get(url + "/ui/config").json()
    stats = next(d for d in config["dependencies"] if d["api_name"] == "stats_markdown")
    auth = {"Authorization": f"Bearer {KEY}"}
    idle_engine(url)  # an earlier test's cancelled generation may still be winding down
    chat = {"messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 200,
            "min_tokens": 200, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text = ("ภาษาไทย" * 30_000)[:199_000]  # the largest text a request may hold
    big = ("ภาษาไทย" * 100_000)[:690_000]  # 2.07 MB of UTF-8: past it, never counted
    session = uuid.uuid4().hex
    kinds = {}
    for kind, payload in (("text", text),) * 3 + (("big", big),) * 3:
        r = httpx.post(f"{url}{UI}/queue/join", timeout=60, json={
            "fn_index": stats["id"], "data": [payload, 100], "session_hash": session,
            "event_data": None, "trigger_id": None})
        assert r.status_code == 200, r.text[:300]
        kinds[r.json()["event_id"]] = kind

    def engine_gauges() -> dict[str, float]:
        lines = httpx.get(url + "/metrics", headers=auth, timeout=30).text.splitlines()
        return {name: float(line.rsplit(" ", 1)[1]) for line in lines for name in ("running", "waiting")
                if line.startswith(f"thai:num_requests_{name}{{")}

    def keyed_chat() -> tuple[int, dict[str, float], int]:
        gauges, tokens = {}, 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat, headers=auth,
                          timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if not gauges and event["choices"] and event["choices"][0]["delta"].get("content"):
                    gauges = engine_gauges()  # while it generates: who else holds a row
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            return r.status_code, gauges, tokens

    in_progress, most, answers = set(), 0, {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        chat_done = None
        with httpx.stream("GET", f"{url}{UI}/queue/data", params={"session_hash": session},
                          timeout=120) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: {"):
                    continue
                message = json.loads(line[6:])
                event = message.get("event_id")
                if message["msg"] == "process_starts":
                    in_progress.add(event)
                    most = max(most, len(in_progress))
                    if chat_done is None:
                        chat_done = pool.submit(keyed_chat)
                elif message["msg"] == "process_completed":
                    in_progress.discard(event)
                    answers[event] = (message.get("success"),
                                      json.dumps(message["output"], ensure_ascii=False))
                    if len(answers) == len(kinds):
                        break
        status, gauges, tokens = chat_done.result()
    assert status == 200 and tokens == 200
    assert gauges == {"running": 1.0, "waiting": 0.0}, gauges
    assert most == 1, "the counters run one at a time"
    assert set(answers) == set(kinds) and all(ok for ok, _ in answers.values()), answers
    assert all("too long" in answers[e][1] for e, kind in kinds.items() if kind == "big")
    assert all("too long" not in answers[e][1] for e, kind in kinds.items() if kind == "text")


def test_oversized_text_is_not_counted(default_ui):
    """A text over the request limit gets a one-line answer, not seconds of segmentation."""
    from thai_ui.handlers import MAX_TEXT_CHARS

    config = httpx.get(default_ui.url + "/ui/config").json()
    stats = next(d for d in config["dependencies"] if d["api_name"] == "stats_markdown")
    answer = call_function(default_ui.url, stats, ["ก" * (MAX_TEXT_CHARS + 1), 100], {})
    assert "too long" in answer  # refused by its length, before any segmentation


# --------------------------------------------------------------- 5. uploads
def upload_dir_of(root: Path, server) -> Path:
    return root / str(server.pid)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_uploads_need_a_length_and_fit_the_limits(public_ui, upload_root):
    folder = upload_dir_of(upload_root, public_ui)
    before = files_under(folder)

    def chunked():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.txt\"\r\n\r\n"
        for _ in range(40):
            yield b"x" * 10_000
        yield b"\r\n--b--\r\n"

    r = httpx.post(f"{public_ui.url}{UI}/upload", content=chunked(),
                   headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 411
    r = httpx.post(f"{public_ui.url}{UI}/upload", files={"files": ("big.txt", b"x" * 250_000)})
    assert r.status_code == 413 and "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]
    assert files_under(folder) == before, "a refused upload leaves nothing behind"


def test_upload_answers_hide_server_paths_and_the_quota_holds(public_ui, upload_root):
    folder = upload_dir_of(upload_root, public_ui)
    r = httpx.post(f"{public_ui.url}{UI}/upload", files={"files": ("ข่าว.txt", "ข่าววันนี้".encode())})
    assert r.status_code == 200
    (token,) = r.json()
    assert token.startswith("upload/") and str(upload_root) not in r.text and "/tmp" not in r.text
    fetched = httpx.get(f"{public_ui.url}{UI}/file={token}",
                        headers={"Range": "bytes=0-5", "Authorization": "Bearer leak-me",
                                 "Cookie": "session=leak-me"})
    assert fetched.status_code == 206
    assert "leak-me" not in str(fetched.headers)
    assert any(p.name == "ข่าว.txt" for p in files_under(folder))
    # The quota (300,000 bytes here) counts what is kept.
    statuses = [httpx.post(f"{public_ui.url}{UI}/upload",
                           files={"files": (f"f{i}.bin", os.urandom(150_000))}).status_code
                for i in range(3)]
    assert statuses[0] == 200 and statuses[-1] == 507


def test_upload_folder_is_removed_at_exit_and_stale_ones_at_start(model_env, tmp_path):
    root = tmp_path / "uploads"
    stale = root / "999999999"  # no such process
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("x")
    server = start_server({**model_env, "THAI_UI_UPLOAD_DIR": str(root)}, tmp_path / "log")
    try:
        assert not stale.exists()
        assert httpx.post(f"{server.url}{UI}/upload", files={"files": ("a.txt", b"abc")}).status_code == 200
        assert files_under(root / str(server.pid))
    finally:
        assert server.stop() == 0
    assert not (root / str(server.pid)).exists()


def test_upload_store_expires_old_files_and_partials(tmp_path):
    from thai_ui.uploads import UploadStore

    store = UploadStore(tmp_path, quota_bytes=1000, ttl_s=100, partial_ttl_s=10)
    store.prepare()
    kept = store.dir / "abc" / "new.txt"
    kept.parent.mkdir()
    kept.write_text("new")
    old = store.dir / "def" / "old.txt"
    old.parent.mkdir()
    old.write_text("old")
    partial = store.dir / "tmpupload"
    partial.write_bytes(b"half")
    now = time.time()
    os.utime(old, (now - 200, now - 200))
    os.utime(partial, (now - 20, now - 20))
    assert store.sweep(now) == 2
    assert kept.exists() and not old.exists() and not partial.exists() and not old.parent.exists()
    assert store.resolve("upload/abc/new.txt") == kept.resolve()
    for outside in ("upload/../../etc/passwd", "/etc/passwd", "abc/new.txt", "upload/", "",
                    str(store.dir), "upload/abc/new.txt\x00", "upload/abc", "upload/" + "a" * 5000,
                    None, 42):
        assert store.resolve(outside) is None, outside
    link = store.dir / "abc" / "link"
    link.symlink_to("/etc/passwd")
    assert store.resolve("upload/abc/link") is None
    used = store.usage_bytes()
    assert 3 <= used < 100 and store.has_room(1000 - used) and not store.has_room(1001 - used)


# ------------------------------------------------------------- 6. the rest
def test_deep_nesting_in_events_is_a_400(public_ui):
    deep = "[" * 5000 + "]" * 5000
    r = httpx.post(f"{public_ui.url}{UI}/queue/join", content=f'{{"fn_index": 5, "data": {deep}}}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "Traceback" not in public_ui.log()[-20000:]


def test_forwarded_host_from_a_client_is_ignored(public_ui):
    r = httpx.get(public_ui.url + "/ui/config", headers={"X-Forwarded-Host": "evil.example",
                                                         "X-Forwarded-Proto": "https"})
    assert "evil.example" not in r.text
    page = httpx.get(public_ui.url + "/ui/", headers={"X-Forwarded-Host": "evil.example"})
    assert "evil.example" not in page.text


def test_internal_errors_show_no_exception_text(public_ui):
    config = httpx.get(public_ui.url + "/ui/config").json()
    length_radio = next(d for d in config["dependencies"] if d["api_name"] == "lambda")
    r = httpx.post(f"{public_ui.url}{UI}/run/predict", json={
        "fn_index": length_radio["id"], "data": [{"not": "hashable"}, 3], "session_hash": "e"})
    assert r.status_code >= 400
    assert "unhashable" not in r.text and "Traceback" not in r.text


def test_anonymous_pages_name_no_server_path(public_ui, model_env):
    texts = [httpx.get(public_ui.url + path).text for path in ("/ui/", "/ui/config", "/health")]
    for text in texts:
        for secret in (model_env["THAI_LORA_PATH"], model_env["THAI_BASE_MODEL"], "/tmp/"):
            assert secret not in text
    assert "thai-qwen-lora" in texts[1]


def test_streamed_results_name_uploads_by_token_even_when_split(tmp_path):
    """Event results (and the queue's SSE) are rewritten as they stream, across chunk edges."""
    import asyncio

    from thai_ui.guard import UIGuard
    from thai_ui.uploads import UploadStore

    store = UploadStore(tmp_path, quota_bytes=1000, ttl_s=100)
    store.prepare()
    guard = UIGuard(None, uploads=store, functions=None, per_minute=0, burst=1)
    path = f'data: {{"path": "{store.dir}/abc/x.txt"}}\n\n'.encode()
    cut = path.index(b"/abc") - 5  # inside the folder's path
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def run():
        rewriting = guard._hiding_paths(send)
        await rewriting({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-length", b"99")]})
        await rewriting({"type": "http.response.body", "body": path[:cut], "more_body": True})
        await rewriting({"type": "http.response.body", "body": path[cut:], "more_body": True})
        await rewriting({"type": "http.response.body", "body": b"", "more_body": False})

    asyncio.run(run())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body == b'data: {"path": "upload/abc/x.txt"}\n\n'
    assert all(k != b"content-length" for k, _ in sent[0]["headers"])


# ----------------------------------------------- 7. documents and batch files
# The summarize tab's file, the batch tab's table, and summarize_file (public by name): each
# takes a file, so each must take only uploads of this process, whichever way it is called.
FILE_FUNCTIONS = {"load_document": [], "summarize_file": [16, 0.0], "batch_columns": [],
                  "run_batch": ["text", 16, 0.0]}


def test_file_and_batch_functions_refuse_server_paths(public_ui, adapter_file):
    config = httpx.get(public_ui.url + "/ui/config").json()
    deps = {d["api_name"]: d for d in config["dependencies"]}
    for name, rest in FILE_FUNCTIONS.items():
        fn = deps[name]
        for target in (*TARGETS, str(adapter_file), "upload/../../../../etc/passwd",
                       "http://127.0.0.1:1/x.csv"):
            data = [{"path": target, "meta": FILE_META, "orig_name": "x.csv"}, *rest]
            answer = call_function(public_ui.url, fn, data, {})
            assert answer.startswith("400") and "file_not_allowed" in answer, (name, target, answer)
            assert secrets_in(answer, adapter_file.read_bytes()[8:40]) == []
    # By name only summarize_file answers, and it too takes only uploads.
    r = httpx.post(f"{public_ui.url}{UI}/call/summarize_file", json={
        "data": [{"path": "/proc/self/environ", "meta": FILE_META}, 16, 0.0]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_allowed"
    for name in ("load_document", "batch_columns", "run_batch", "stop_batch", "end_session"):
        for route in ("call", "run", "api"):
            r = httpx.post(f"{public_ui.url}{UI}/{route}/{name}", json={"data": []})
            assert r.status_code == 404, (route, name, r.status_code)


def call_in_session(url: str, fn: dict, data: list, session: str, timeout: float = 60) -> str:
    """A queued call in a given session (the batch tab's events follow each other)."""
    body = {"fn_index": fn["id"], "data": data, "session_hash": session, "event_data": None,
            "trigger_id": None}
    r = httpx.post(f"{url}{UI}/queue/join", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = []
    with httpx.stream("GET", f"{url}{UI}/queue/data", params={"session_hash": session},
                      timeout=timeout) as stream:
        # Until Gradio closes the stream: the next call of the session joins after that (one
        # joined while this stream is closing is dropped with it).
        for line in stream.iter_lines():
            out.append(line)
            if "close_stream" in line:
                break
    return "\n".join(out)


def test_batch_result_is_an_upload_named_by_token(default_ui):
    config = httpx.get(default_ui.url + "/ui/config").json()
    run_batch = next(d for d in config["dependencies"] if d["api_name"] == "run_batch")
    table = "text\nข่าววันนี้ฝนตกหนัก\nน้ำท่วมหลายพื้นที่\n".encode()
    r = httpx.post(f"{default_ui.url}{UI}/upload", files={"files": ("rows.csv", table)})
    assert r.status_code == 200
    (token,) = r.json()
    columns = next(d for d in config["dependencies"] if d["api_name"] == "batch_columns")
    file = {"path": token, "meta": FILE_META, "orig_name": "rows.csv"}
    session = uuid.uuid4().hex  # the page's order: the upload lists the columns, then run
    listed = call_in_session(default_ui.url, columns, [file], session)
    assert '"choices"' in listed and "text" in listed and "/tmp/" not in listed
    answer = call_in_session(default_ui.url, run_batch, [file, "text", 8, 0.0], session)
    assert "process_completed" in answer and 'data-state=\\"done\\"' in answer, answer[-2000:]
    assert "/tmp/" not in answer and "thai-llm-ui-uploads" not in answer
    (result,) = set(re.findall(r'"path":\s*"(upload/[^"]+-summaries\.csv)"', answer))
    fetched = httpx.get(f"{default_ui.url}{UI}/file={result}", headers={"Cookie": "s=leak-me"})
    assert fetched.status_code == 200 and "leak-me" not in str(fetched.headers)
    assert fetched.content.decode("utf-8-sig").splitlines()[0] == "row,text,summary,error"


# ---------------------------------------------- 8. component chat messages
def component_messages(secret: str) -> list[dict]:
    """Chat-history content items that make Gradio build a component from the client's
    constructor arguments, each naming a file outside the upload folder (not under "path")."""
    button = {"component": "button", "value": "x", "constructor_args": {"icon": secret},
              "props": {}}
    return [{**button, "type": "component"},
            button,  # no "type": pydantic still reads it as a component message
            {"type": "component", "component": "chatbot", "value": [], "props": {},
             "constructor_args": {"avatar_images": [secret, secret]}},
            {"type": "component", "component": "uploadbutton", "value": None, "props": {},
             "constructor_args": {"icon": secret}}]


def test_component_chat_messages_copy_no_server_file(public_ui, upload_root):
    """Gradio builds a chat message's component from ``constructor_args``, whose file
    arguments it copies from the system's temp folder into the upload folder, unchecked:
    a 0.5 s request used to fill every visitor's quota. Each shape is refused (400), nothing
    is copied and the upload folder's size is what it was."""
    import tempfile

    folder = upload_dir_of(upload_root, public_ui)
    secret_bytes = os.urandom(200_000)
    secret = Path(tempfile.gettempdir()) / f"thai-secret-{uuid.uuid4().hex}.png"
    secret.write_bytes(secret_bytes)
    try:
        before = sum(p.stat().st_size for p in files_under(folder))
        config = httpx.get(public_ui.url + "/ui/config").json()
        deps = {d["api_name"]: d for d in config["dependencies"]}
        for item in component_messages(str(secret)):
            history = [{"role": "user", "content": [item]},
                       {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
            for name in ("_pop_last_user_message_1", "lambda_15", "option_clicked"):
                answer = call_function(public_ui.url, deps[name], [history], {})
                assert answer.startswith("400") and "component_not_allowed" in answer, \
                    (name, item, answer[:300])
            # as a chat message's whole content, not inside a list, too
            answer = call_function(public_ui.url, deps["_pop_last_user_message_1"],
                                   [[{"role": "user", "content": item}]], {})
            assert answer.startswith("400") and "component_not_allowed" in answer, answer[:300]
        copied = [p for p in files_under(folder) if p.stat().st_size == len(secret_bytes)
                  and p.read_bytes() == secret_bytes]
        assert copied == []
        assert sum(p.stat().st_size for p in files_under(folder)) == before
        # An ordinary history (text and an uploaded file) still goes through.
        r = httpx.post(f"{public_ui.url}{UI}/upload", files={"files": ("a.txt", b"hello")})
        assert r.status_code == 200
        (token,) = r.json()
        answer = call_function(public_ui.url, deps["_pop_last_user_message_1"],
                               [history_with(token)], {})
        assert answer.startswith("200"), answer[:300]
    finally:
        secret.unlink()
