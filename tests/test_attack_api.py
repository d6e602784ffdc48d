"""Attacks from a security review, replayed against real servers over HTTP.

Each test sends what the reviewer sent and checks the answer and the server's
log. Every one failed on the code before the fixes (the figures measured then
are in the docstrings):

1. JSON nested hundreds deep -> 400, not a 500 with a 100 KB traceback.
2. Field names with newlines or 1.9 MB long -> no forged or huge log lines.
3. X-Forwarded-* believed only from THAI_FORWARDED_ALLOW_IPS.
4. Wrong API keys limited per client address (Bearer and the UI's Basic).
5. The browser redirect from ``/`` is relative: a forged Host never lands in it.
6. No server path in /health, /ready, /v1/models, the UI banner or 503 errors.
7. A client that times out is a 499 and one info line, not a 5xx and a traceback.

Servers bind 127.0.0.1; other loopback addresses (127.0.0.2, ...) stand in for
other clients and for the trusted proxy. Loops are bounded in count and time.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import httpx
import pytest

from tests.support import ServerProcess, start_server

KEY = "attack-key-" + "0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, SUMMARIZE = "/v1/chat/completions", "/v1/summarize"
PROXY = "127.0.0.9"  # the one peer the servers below trust as a reverse proxy
MAX_LOG_LINE = 4096 + 200  # SafeLogFilter's cut, plus the time/level/logger/id prefix


def client_at(address: str, **kwargs) -> httpx.Client:
    """An HTTP client whose connections come from ``address`` (any 127.x works on Linux)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30, **kwargs)


def log_since(server: ServerProcess, offset: int, settle: float = 0.3) -> str:
    time.sleep(settle)  # the access line is written just after the response
    return server.log_path.read_bytes()[offset:].decode("utf-8", "replace")


def log_size(server: ServerProcess) -> int:
    return server.log_path.stat().st_size


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(model_env, tmp_path_factory):
    """Keys, the public UI, and one trusted proxy address."""
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_ENABLE_UI": "true",
           "THAI_FORWARDED_ALLOW_IPS": PROXY}
    process = start_server(env, tmp_path_factory.mktemp("attack-api"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def protected(model_env, tmp_path_factory):
    """The UI behind Basic authentication; the default wrong-key budget (10 per minute)."""
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_ENABLE_UI": "true", "THAI_PROTECT_UI": "true"}
    process = start_server(env, tmp_path_factory.mktemp("attack-protected"))
    yield process
    process.stop()


# --------------------------------------------------------------- 1. deep JSON
@pytest.mark.parametrize("depth", [330, 900, 5000])
def test_deeply_nested_json_is_a_400_with_no_traceback(server, depth):
    """Before: depths 330-900 gave 500 and ~109 KB of RecursionError traceback per request."""
    nested = "[" * depth + "]" * depth
    bodies = {CHAT: '{"messages":[{"role":"user","content":"x"}],"max_tokens":2,"extra":%s}' % nested,
              SUMMARIZE: '{"text":"ข่าว","max_tokens":2,"extra":%s}' % nested}
    for path, body in bodies.items():
        offset = log_size(server)
        r = httpx.post(server.url + path, content=body,
                       headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["type"] == "invalid_request_error"
        written = log_since(server, offset)
        assert "Traceback" not in written and "RecursionError" not in written
        assert len(written) < 1000, written[:2000]  # the access line, nothing more


def test_nesting_a_real_request_needs_still_works(server):
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}}}}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "สวัสดี"}]}],
            "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
                "name": "nested", "schema": nested}}}
    assert httpx.post(server.url + CHAT, json=body, headers=AUTH).status_code == 200


# ------------------------------------------------------------- 2. log forging
FORGED = "2026-01-01 00:00:00,000 CRITICAL thai.server [-]: FORGED admin login from 10.0.0.1"


def test_field_names_cannot_forge_log_lines(server):
    """Before: the unknown field's name went to the log as is, newline included. (Unknown
    fields are refused now, and the refusal is logged with the name.)"""
    offset = log_size(server)
    for evil in (f"x\n{FORGED}", f"x\r\n{FORGED}", f"x\x1b[2K\r{FORGED}", f"x\u2028{FORGED}"):
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, evil: 1}
        assert httpx.post(server.url + CHAT, json=body, headers=AUTH).status_code == 400
    written = log_since(server, offset)
    assert "FORGED" in written  # the name is logged ...
    assert not any(line.startswith(FORGED[:23]) for line in written.splitlines())  # ... on its own line never
    assert "\x1b" not in written and "\r" not in written and "\u2028" not in written
    assert "\\n2026-01-01" in written and "\\x1b[2K" in written  # escaped, readable


def test_a_huge_field_name_does_not_flood_the_log_or_the_answer(server):
    """Before: a 1.9 MB field name added 1.9 MB to the log."""
    name = "A" * 1_900_000
    offset = log_size(server)
    r = httpx.post(server.url + CHAT, headers={**AUTH, "Content-Type": "application/json"},
                   content=json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                       name: 1}))
    assert r.status_code == 400 and len(r.content) < 2048  # refused, the name clipped
    written = log_since(server, offset)
    assert len(written) < 8192
    assert max(len(line) for line in written.splitlines()) <= MAX_LOG_LINE
    # invalid input quoting client text: the error stays small
    for body in ({"messages": [{"role": "user", "content": "x"}], "model": "m" * 1_900_000},
                 {"messages": {name: 1}}, {"messages": [{"role": name, "content": "x"}]},
                 {"messages": [{"role": "user", "content": "x"}], "stop": [name]}):
        r = httpx.post(server.url + CHAT, headers={**AUTH, "Content-Type": "application/json"},
                       content=json.dumps(body))
        assert r.status_code == 400 and len(r.content) < 2048, (r.status_code, len(r.content))


def test_every_log_line_is_short_and_clean(server):
    """Whatever ran before in this module: no line of this server's log is long or has a control
    character (tracebacks included: their lines are indented, escaped and cut)."""
    log = server.log_path.read_bytes().decode("utf-8", "replace")
    # tqdm's progress bar at model load writes \r itself, before logging is involved
    lines = [line for line in log.split("\n") if "Loading weights" not in line]
    assert all(len(line) <= MAX_LOG_LINE for line in lines)
    assert not any(re.search("[\x00-\x08\x0b-\x1f\x7f]", line) for line in lines)


# --------------------------------------------------------- 3. trusted proxies
def access_line(server: ServerProcess, probe: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = next((entry for entry in server.log().splitlines() if probe in entry and "uvicorn.access" in entry), "")
        if line:
            return line
        time.sleep(0.1)
    raise AssertionError(f"no access line for {probe}")


def test_forwarded_headers_from_an_untrusted_peer_are_dropped(server):
    """Before: any loopback client's X-Forwarded-For became its address (uvicorn trusted
    127.0.0.1), and anyone's X-Forwarded-Host became the UI's root URL."""
    probe = uuid.uuid4().hex
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9",
             "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
             "X-Gradio-Server": "http://evil.example"}
    with client_at("127.0.0.1") as http:
        assert http.get(f"{server.url}/v1/models?probe={probe}", headers={**AUTH, **spoof}).status_code == 200
        line = access_line(server, probe)
        assert "127.0.0.1:" in line and "203.0.113.9" not in line
        config = http.get(server.url + "/ui/config", headers=spoof)
        assert config.status_code == 200 and "evil.example" not in config.text
        assert config.json()["root"] == "/ui"  # relative: the page resolves it (thai_ui.root_url)
        page = http.get(server.url + "/ui/", headers=spoof)
        assert page.status_code == 200 and "evil.example" not in page.text


def test_forwarded_headers_from_the_trusted_proxy_are_applied(server):
    probe = uuid.uuid4().hex
    with client_at(PROXY) as http:
        headers = {**AUTH, "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Host": "api.example.com"}
        assert http.get(f"{server.url}/v1/models?probe={probe}", headers=headers).status_code == 200
        assert "198.51.100.7:" in access_line(server, probe)
        config = http.get(server.url + "/ui/config", headers=headers)
        assert config.json()["root"] == "/ui"  # relative whatever the host (thai_ui.root_url)
        # nginx passes a client's X-Gradio-Server through: never believed, even via the proxy
        config = http.get(server.url + "/ui/config", headers={**headers, "X-Gradio-Server": "http://evil.example"})
        assert config.json()["root"] == "/ui" and "evil.example" not in config.text


# ------------------------------------------------------ 4. wrong-key guessing
def test_wrong_keys_are_limited_per_address(protected):
    """Before: 300 wrong keys in 5 s, all 401. Now the 11th wrong key within a minute, from
    any spoofed X-Forwarded-For, gets 429; the right key from there too; other addresses
    and clients that send no key are unaffected."""
    statuses = []
    with client_at("127.0.0.2") as attacker:
        for i in range(25):
            r = attacker.get(protected.url + "/v1/models", headers={
                "Authorization": f"Bearer guess-{i:04d}-abcdefgh", "X-Forwarded-For": f"203.0.113.{i}"})
            statuses.append(r.status_code)
        assert statuses[:10] == [401] * 10 and statuses[10:] == [429] * 15, statuses
        assert r.json()["error"]["code"] == "too_many_auth_failures"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # locked out before the key is checked: the right key gives no signal either
        assert attacker.get(protected.url + "/v1/models", headers=AUTH).status_code == 429
        assert attacker.get(protected.url + "/health").status_code == 200  # probes need no key
    with client_at("127.0.0.3") as other:
        assert other.get(protected.url + "/v1/models", headers=AUTH).status_code == 200
        assert other.post(protected.url + CHAT, headers=AUTH, json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200
    with client_at("127.0.0.4") as keyless:  # no key is no guess: a browser's first try
        assert [keyless.get(protected.url + "/v1/models").status_code for _ in range(15)] == [401] * 15
        assert keyless.get(protected.url + "/v1/models", headers=AUTH).status_code == 200
    assert "127.0.0.2 sent 10 wrong API keys" in protected.log()


def test_wrong_ui_passwords_are_limited_too(protected):
    def basic(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"analyst:{password}".encode()).decode()}

    with client_at("127.0.0.5") as attacker:
        statuses = [attacker.get(protected.url + "/ui/", headers=basic(f"pw-{i}")).status_code
                    for i in range(12)]
        assert statuses == [401] * 10 + [429] * 2, statuses
        assert attacker.get(protected.url + "/ui/", headers=basic(KEY)).status_code == 429
    with client_at("127.0.0.6") as user:
        assert user.get(protected.url + "/ui/", headers=basic(KEY), follow_redirects=True).status_code == 200


# ------------------------------------------------------- 5. Host in redirects
def test_redirects_never_carry_the_host_header(server):
    """Before: ``GET /`` with ``Host: evil.example`` redirected to ``http://evil.example/ui/``;
    Starlette's slash redirects (``/ui``, ``/docs/``) did the same."""
    forged = {"Host": "evil.example", "Accept": "text/html"}
    r = httpx.get(server.url + "/", headers=forged)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    for path, target in (("/ui", "/ui/"), ("/v1/models/", "/v1/models"), ("/docs/", "/docs")):
        r = httpx.get(server.url + path, headers={**forged, **AUTH})
        assert r.status_code in (301, 302, 307, 308), (path, r.status_code)
        assert r.headers["location"] == target, (path, r.headers["location"])
    assert httpx.get(server.url + "/", headers={**AUTH, "Accept": "application/json"}).status_code == 200


# -------------------------------------------------------- 6. server paths shown
def ui_banner(url: str, headers: dict | None = None) -> str:
    config = httpx.get(url + "/ui/config", headers=headers, timeout=120).json()
    status = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model-status")
    fn = next(i for i, d in enumerate(config["dependencies"])
              if status in d.get("outputs", []) and any(t[1] == "load" for t in d.get("targets", [])))
    r = httpx.post(url + "/ui/gradio_api/run/predict", headers=headers,
                   json={"fn_index": fn, "data": [], "session_hash": uuid.uuid4().hex[:10]},
                   timeout=120)  # a hang guard: the banner's first render is slow on a busy machine
    assert r.status_code == 200, r.text[:300]
    return r.json()["data"][0]


def test_anonymous_users_see_no_server_paths(server, demo_checkpoint):
    """Before: /health showed ``base_model`` and ``adapter`` as absolute folders, /v1/models
    the base folder as ``root``, and the UI banner both."""
    base, lora = (str(p) for p in demo_checkpoint)
    health = httpx.get(server.url + "/health").json()
    assert health["model"] == "thai-qwen-lora" and health["adapter_loaded"] is True
    assert health["base_model"] is None and "adapter" not in health  # a local folder: not shown
    assert health["device"] == "cpu" and health["demo"] is False
    banner = ui_banner(server.url)
    assert "thai-qwen-lora" in banner and "LoRA adapter" in banner and "cpu" in banner
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["root"] is None
    for text in (json.dumps(health), banner, json.dumps(models), httpx.get(server.url + "/ready").text,
                 httpx.get(server.url + "/", headers=AUTH).text):
        for path in (base, lora, str(demo_checkpoint[0].parent)):
            assert path not in text


@pytest.fixture(scope="module")
def broken(demo_checkpoint, tmp_path_factory):
    """A server whose base model folder has no weights; it stays up to report why."""
    folder = tmp_path_factory.mktemp("secret-user-home") / "models" / "broken-base"
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((demo_checkpoint[0] / "config.json").read_bytes())
    env = {"THAI_BASE_MODEL": str(folder), "THAI_LORA_PATH": str(demo_checkpoint[1]),
           "THAI_REQUIRE_MODEL": "false", "THAI_ENABLE_UI": "true"}
    process = start_server(env, tmp_path_factory.mktemp("attack-broken"), wait_ready=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and httpx.get(process.url + "/health").json()["status"] == "loading":
        time.sleep(0.2)
    yield process, folder
    process.stop()


def test_load_failures_are_shown_without_paths(broken):
    """Before: the load error quoted the base model's absolute folder in /health, /ready,
    the UI banner and every 503."""
    process, folder = broken
    health = httpx.get(process.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "cannot load base model" in health.json()["error"] and "<path>" in health.json()["error"]
    ready = httpx.get(process.url + "/ready").json()
    chat = httpx.post(process.url + CHAT, json={"messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 503
    for text in (health.text, json.dumps(ready), ui_banner(process.url), chat.text):
        assert str(folder) not in text and "secret-user-home" not in text and "broken-base" not in text
    assert str(folder) in process.log()  # the operator still finds it in the log


# ------------------------------------------------------ 7. client disconnects
def test_a_client_timeout_cancels_the_generation_quietly(server):
    """Before: a client timing out on a non-streamed chat completion was logged as
    "Exception in ASGI application" with a traceback and counted as a 5xx in /metrics."""
    before = httpx.get(server.url + "/metrics", headers=AUTH).text
    offset = log_size(server)
    body = {"messages": [{"role": "user", "content": "เล่าเรื่องยาว ๆ"}], "max_tokens": 1800,
            "min_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + CHAT, json=body, headers=AUTH, timeout=0.3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "client disconnected" not in log_since(server, offset, 0):
        time.sleep(0.1)
    written = log_since(server, offset)
    assert "Exception in ASGI application" not in written and "Traceback" not in written
    assert len([line for line in written.splitlines() if "client disconnected" in line]) == 1
    health = httpx.get(server.url + "/health").json()
    assert health["requests_running"] == 0 and health["requests_waiting"] == 0
    after = httpx.get(server.url + "/metrics", headers=AUTH).text
    labels = {"handler": CHAT, "method": "POST"}
    assert metric(after, "http_requests_total", status="5xx", **labels) == \
        metric(before, "http_requests_total", status="5xx", **labels)
    assert metric(after, "http_requests_total", status="4xx", **labels) == \
        metric(before, "http_requests_total", status="4xx", **labels) + 1
    aborted = "thai:request_success_total"
    assert metric(after, aborted, finished_reason="abort") == metric(before, aborted, finished_reason="abort") + 1
    generated = metric(after, "thai:generation_tokens_total") - metric(before, "thai:generation_tokens_total")
    assert generated < 1800, "the generation was cancelled, not run to its end"
