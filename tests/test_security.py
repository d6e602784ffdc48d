"""Access and HTTP guards: API keys, the public-UI boundary, request ids, headers, body size,
rate limit, CORS, and what never reaches the logs.

A real server with keys and the UI checks the boundary and the logs; the
guards' finer cases run in-process over a fake engine (same app, same
middlewares, no model).
"""

from __future__ import annotations

import base64
import logging
import uuid

import httpx
import openai
import pytest
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient

from api.security import APIKeys, TokenBuckets
from api.server import create_app
from api.settings import Settings
from tests.fakes import FakeEngine
from tests.support import REPO, free_port, start_server

KEY_A = "key-a-" + "0123456789abcdef"
KEY_B = "key-b-" + "fedcba9876543210"
CHAT = {"messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 4}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(key: str, user: str = "analyst") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


# ------------------------------------------------------------------ real server
@pytest.fixture(scope="module")
def keyed_server(model_env, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# analysts\n{KEY_B}\n\n")
    # The wrong-key limit (10 a minute per address) is tested in test_attack_api; here it
    # would turn the later tests' deliberate wrong keys into 429s.
    env = {**model_env, "THAI_API_KEYS": KEY_A, "THAI_API_KEY_FILE": str(key_file),
           "THAI_ENABLE_UI": "true", "THAI_AUTH_FAILURES_PER_MINUTE": "0"}
    server = start_server(env, tmp_path_factory.mktemp("keyed"))
    yield server
    server.stop()


PROTECTED = [("GET", "/"), ("GET", "/v1/models"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/summarize")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_route_but_the_probes_needs_a_key(keyed_server, method, path):
    body = CHAT if "chat" in path else {"text": "ข่าววันนี้", "max_tokens": 4}
    kwargs = {"json": body} if method == "POST" else {}
    missing = httpx.request(method, keyed_server.url + path, **kwargs)
    wrong = httpx.request(method, keyed_server.url + path, headers=bearer("not-a-real-key"), **kwargs)
    for response, code in ((missing, "missing_api_key"), (wrong, "invalid_api_key")):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for key in (KEY_A, KEY_B):  # from the variable and from the file
        assert httpx.request(method, keyed_server.url + path, headers=bearer(key), **kwargs).status_code == 200


def test_probes_are_open(keyed_server):
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    assert httpx.get(keyed_server.url + "/ready").json() == {"status": "ready", "reason": None}


def test_public_ui_does_not_open_the_api(keyed_server):
    page = httpx.get(keyed_server.url + "/ui/", follow_redirects=True)
    assert page.status_code == 200 and "<html" in page.text.lower()
    # A browser on the site is sent to the UI without a key, but gets no API data.
    root = httpx.get(keyed_server.url + "/", headers={"Accept": "text/html"})
    assert root.status_code == 307 and root.headers["location"].endswith("/ui/")
    # The UI's cookies, origin and referer do not stand in for a key.
    browser = {"Origin": keyed_server.url, "Referer": keyed_server.url + "/ui/"}
    r = httpx.post(keyed_server.url + "/v1/chat/completions", json=CHAT, headers=browser,
                   cookies=page.cookies)
    assert r.status_code == 401


def test_openai_client_needs_the_key(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY_A)
    assert good.chat.completions.create(model="thai-qwen-lora", **CHAT).choices
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sk-wrong-key-123")
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="thai-qwen-lora", **CHAT)


def test_request_ids_and_headers(keyed_server):
    mine = "trace-" + uuid.uuid4().hex
    r = httpx.get(keyed_server.url + "/v1/models", headers={**bearer(KEY_A), "X-Request-ID": mine})
    assert r.headers["X-Request-ID"] == mine
    generated = httpx.get(keyed_server.url + "/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert generated.headers["X-Request-ID"] != "bad id\twith spaces" and len(generated.headers["X-Request-ID"]) == 32
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Cache-Control"] == "no-store"
    assert "X-Frame-Options" not in r.headers and "server" not in r.headers
    docs = httpx.get(keyed_server.url + "/docs", headers=bearer(KEY_A))
    assert "cdn.jsdelivr.net" in docs.headers["Content-Security-Policy"]
    ui = httpx.get(keyed_server.url + "/ui/", follow_redirects=True)
    assert ui.headers["X-Content-Type-Options"] == "nosniff" and "X-Frame-Options" not in ui.headers
    assert "frame-ancestors 'self'" in ui.headers["Content-Security-Policy"]
    assert f"[{mine}]" in keyed_server.log(), "the request id is on the request's log lines"


def test_keys_and_prompts_stay_out_of_the_log(keyed_server):
    marker = "ความลับ-" + uuid.uuid4().hex
    r = httpx.post(keyed_server.url + "/v1/chat/completions", headers=bearer(KEY_A),
                   json={**CHAT, "messages": [{"role": "user", "content": marker}]})
    assert r.status_code == 200
    answer = r.json()["choices"][0]["message"]["content"]
    httpx.get(keyed_server.url + "/v1/models", headers=bearer("wrong-" + KEY_B))
    log = keyed_server.log()
    assert KEY_A not in log and KEY_B not in log and KEY_B[6:] not in log
    assert marker not in log
    assert len(answer) < 8 or answer not in log


# --------------------------------------------------------------- in-process
def make_client(**overrides) -> TestClient:
    settings = Settings.from_overrides({"enable_ui": False, **overrides})
    app = create_app(settings, FakeEngine())

    @app.get("/ui/page", include_in_schema=False)  # stands in for the mounted UI
    async def ui_page() -> PlainTextResponse:
        return PlainTextResponse("ui")

    return TestClient(app, raise_server_exceptions=False)


def test_protected_ui_asks_the_browser_for_a_key():
    with make_client(api_keys=KEY_A, protect_ui=True) as client:
        r = client.get("/ui/page")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert client.get("/ui/page", headers=basic("wrong-password")).status_code == 401
        assert client.get("/ui/page", headers=basic(KEY_A)).status_code == 200
        assert client.get("/ui/page", headers=bearer(KEY_A)).status_code == 200
        # Basic credentials open the UI only, never the API.
        assert client.post("/v1/chat/completions", json=CHAT, headers=basic(KEY_A)).status_code == 401
    with make_client(api_keys=KEY_A) as client:  # unprotected UI: open, API still closed
        assert client.get("/ui/page").status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401


def test_key_check_and_gradio_auth_helper():
    keys = APIKeys([KEY_A, KEY_B])
    assert keys.verify(KEY_A) and keys.verify(KEY_B)
    for wrong in ("", None, KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "ก" * 20):
        assert not keys.verify(wrong)
    assert keys.gradio_auth("anyone", KEY_B) and not keys.gradio_auth(KEY_B, "nope")
    assert not APIKeys([]).enabled


def test_metrics_public_by_setting():
    with make_client(api_keys=KEY_A, metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_body_limit_from_length_and_from_counted_chunks():
    with make_client(max_request_bytes=4096) as client:
        big = {"text": "ก" * 5000}
        r = client.post("/v1/summarize", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the bytes are counted as they arrive
            for _ in range(10):
                yield b"x" * 1000

        r = client.post("/v1/summarize", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert client.post("/v1/summarize", json={"text": "ข่าว", "max_tokens": 4}).status_code == 200


def test_rate_limit_per_key_with_retry_after():
    with make_client(api_keys=f"{KEY_A},{KEY_B}", rate_limit_per_minute=6, rate_limit_burst=3) as client:
        codes = [client.get("/v1/models", headers=bearer(KEY_A)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_A))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 10
        assert client.get("/v1/models", headers=bearer(KEY_B)).status_code == 200  # its own bucket
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_rate_limit_per_client_without_keys():
    with make_client(rate_limit_per_minute=60, rate_limit_burst=2) as client:
        assert [client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]


def test_token_bucket_refills_and_stays_bounded():
    buckets = TokenBuckets(per_minute=60, burst=2, max_clients=100)
    assert buckets.take("a", now=0.0) == 0 and buckets.take("a", now=0.0) == 0
    assert buckets.take("a", now=0.0) == pytest.approx(1.0)
    assert buckets.take("a", now=1.0) == 0  # one token back after a second
    for i in range(1000):
        buckets.take(f"ip-{i}", now=2.0)
    assert len(buckets) == 100


def test_cors_never_wildcard_with_credentials():
    origin = "https://analyst.example"
    with make_client(cors_origins="*") as client:
        r = client.get("/health", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers
    with make_client(cors_origins=origin, api_keys=KEY_A) as client:
        pre = client.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200  # preflights carry no key and must not be refused
        assert pre.headers["access-control-allow-origin"] == origin
        assert pre.headers["access-control-allow-credentials"] == "true"
        denied = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_unhandled_error_has_request_id_and_headers():
    settings = Settings.from_overrides({"enable_ui": False})
    app = create_app(settings, FakeEngine())

    @app.get("/boom", include_in_schema=False)
    async def boom():
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500 and "secret internals" not in r.text
    assert r.headers["X-Request-ID"] == "req-500" and r.headers["X-Content-Type-Options"] == "nosniff"


def test_log_prompts_only_when_asked(caplog):
    marker = "เอกสารลับ-" + uuid.uuid4().hex[:8]
    body = {"messages": [{"role": "user", "content": marker}], "max_tokens": 4}
    for enabled in (False, True):
        caplog.clear()
        with caplog.at_level(logging.DEBUG), make_client(log_prompts=enabled) as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert (marker in caplog.text) is enabled


def test_key_settings_are_validated_without_echoing_keys(tmp_path):
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "THAI_API_KEYS": "short", "THAI_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "THAI_API_KEYS" in out.stderr and "short" not in out.stderr
    env = {**env, "THAI_API_KEYS": "", "THAI_API_KEY_FILE": str(tmp_path / "missing.txt")}
    out = subprocess.run([sys.executable, "app.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "THAI_API_KEY_FILE" in out.stderr and "cannot read" in out.stderr
