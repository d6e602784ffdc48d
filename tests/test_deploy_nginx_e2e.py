"""A real nginx, rendered by the generator, in front of a real app server.

nginx serves HTTPS (a self-signed certificate made here) on loopback under the
sub-path ``/thai`` and proxies to one app process started with the matching
settings (THAI_ROOT_PATH, THAI_MAX_REQUEST_BYTES). The checks are the ones an
operator cares about: tokens stream through the proxy one by one, the UI and
its queue work through it, the rate limit answers 429, an oversized body 413,
and the app sees the client's address from X-Forwarded-For, not a spoofed one.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from tests.deploy_support import generate, nginx_wrapper, self_signed_certificate, start_nginx
from tests.support import ARTIFACTS, REPO, free_port, require_tool, start_server

SUB_PATH = "/thai"
BODY_LIMIT = 16384
API_RATE, API_BURST = 5, 10
CLIENT_ADDRESS = "127.0.0.5"  # another loopback address: nginx and the app see it, not 127.0.0.1


@pytest.fixture(scope="module")
def results():
    """Numbers measured by the tests, written to test-artifacts/deploy-e2e.json at the end."""
    found: dict = {}
    yield found
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "deploy-e2e.json").write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture(scope="module")
def proxied(model_env, tmp_path_factory):
    require_tool("nginx")
    work = tmp_path_factory.mktemp("nginx-e2e")
    cert, key = self_signed_certificate(work)
    # The app trusts the proxy the generated env file names (nginx on loopback), as in production.
    generate(work / "env-only", env={"THAI_MAX_REQUEST_BYTES": str(BODY_LIMIT)})
    env_file = (work / "env-only" / "thai-model-api.env").read_text()
    trusted = next(line.split("=", 1)[1] for line in env_file.splitlines()
                   if line.startswith("THAI_FORWARDED_ALLOW_IPS="))
    app = start_server({**model_env, "THAI_ROOT_PATH": SUB_PATH, "THAI_MAX_REQUEST_BYTES": str(BODY_LIMIT),
                        "THAI_DRAIN_TIMEOUT_S": "5", "THAI_FORWARDED_ALLOW_IPS": trusted}, work / "logs")
    nginx = None
    try:
        http_port, https_port = free_port(), free_port()
        out = work / "out"
        generate(out, "--install-dir", str(REPO), "--domain", "localhost", "--tls", "--sub-path", SUB_PATH,
                 "--listen-address", "127.0.0.1", "--http-port", str(http_port), "--https-port", str(https_port),
                 "--ssl-certificate", str(cert), "--ssl-certificate-key", str(key),
                 "--api-rate", str(API_RATE), "--api-burst", str(API_BURST),
                 env={"THAI_PORT": app.url.rsplit(":", 1)[1], "THAI_MAX_REQUEST_BYTES": str(BODY_LIMIT)})
        nginx = start_nginx(nginx_wrapper(work / "nginx", out / "thai-model-api.nginx"), [http_port, https_port])
        tls = ssl.create_default_context(cafile=str(cert))
        yield SimpleNamespace(app=app, nginx=nginx, cert=cert, tls=tls, http_port=http_port,
                              https_port=https_port, base=f"https://127.0.0.1:{https_port}{SUB_PATH}")
    finally:
        if nginx is not None:
            nginx.stop()
        app.stop()


@pytest.fixture
def client(proxied):
    with httpx.Client(verify=proxied.tls, timeout=60) as http:
        yield http


def stream_arrivals(http: httpx.Client, url: str, tokens: int) -> dict:
    """POST a streamed chat completion; when each piece arrived, and what it carried."""
    body = {"model": "thai-qwen-lora", "messages": [{"role": "user", "content": "เล่าเรื่องสั้น ๆ"}],
            "stream": True, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}
    start = time.perf_counter()
    arrivals, data = [], b""
    with http.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for piece in response.iter_raw():
            if b'"content"' in piece:
                arrivals.append(time.perf_counter() - start)
            data += piece
    events = [line for line in data.decode().splitlines() if line.startswith("data: ")]
    return {"arrivals": arrivals, "events": events, "total_s": time.perf_counter() - start}


def test_http_redirects_to_https(proxied):
    response = httpx.get(f"http://127.0.0.1:{proxied.http_port}{SUB_PATH}/v1/models?x=1")
    assert response.status_code == 301
    assert response.headers["location"] == f"https://127.0.0.1:{proxied.https_port}{SUB_PATH}/v1/models?x=1"


def test_chat_stream_arrives_in_pieces_through_the_proxy(proxied, client, results):
    tokens = 48
    # Warm up first (TLS session, the model's first forward): the measured stream's first
    # piece then shows what buffering would do, not one-off start-up costs.
    stream_arrivals(client, proxied.base + "/v1/chat/completions", 2)
    via = stream_arrivals(client, proxied.base + "/v1/chat/completions", tokens)
    assert via["events"][-1] == "data: [DONE]"
    content_events = [e for e in via["events"] if '"content"' in e]
    assert len(content_events) >= tokens // 2  # a Thai character split across tokens waits for the next
    arrivals = via["arrivals"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    separate = sum(1 for gap in gaps if gap > 0.00025)  # buffered pieces come microseconds apart
    results["stream"] = {"tokens": tokens, "content_pieces": len(arrivals), "separate_arrivals": separate,
                         "first_token_s": round(arrivals[0], 3), "last_token_s": round(arrivals[-1], 3),
                         "median_gap_ms": round(sorted(gaps)[len(gaps) // 2] * 1000, 1)}
    print("stream through nginx:", results["stream"])
    # buffered, every piece would come in one block at the end (checked by hand with
    # proxy_buffering on and X-Accel-Buffering ignored: 48 pieces, all at 5.42 s)
    assert arrivals[0] < 0.5 * arrivals[-1]
    assert separate >= tokens // 4


def test_forwarded_headers_reach_the_app(proxied):
    response = httpx.get(proxied.base + "/", headers={"Accept": "text/html"}, verify=proxied.tls)
    assert response.status_code == 307  # browsers go to the UI, by a relative URL under the prefix
    assert response.headers["location"] == f"{SUB_PATH}/ui/"
    # The UI's root is the path under the prefix; the page resolves it against its own
    # https URL (thai_ui.root_url: it never follows a Host header)
    config = httpx.get(proxied.base + "/ui/config", verify=proxied.tls)
    assert config.status_code == 200
    assert config.json()["root"] == f"{SUB_PATH}/ui"


def test_app_sees_the_client_address_not_a_spoofed_one(proxied, results):
    probe = uuid.uuid4().hex
    transport = httpx.HTTPTransport(verify=proxied.tls, local_address=CLIENT_ADDRESS)
    with httpx.Client(transport=transport, timeout=30) as http:
        response = http.get(f"{proxied.base}/v1/models?probe={probe}", headers={"X-Forwarded-For": "198.51.100.7"})
        assert response.status_code == 200
        assert http.get(proxied.base + "/metrics").status_code == 403  # private outside the host
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and not line:
        line = next((entry for entry in proxied.app.log().splitlines() if probe in entry), "")
        time.sleep(0.1)
    assert line, "the app logged no access line for the probe"
    results["forwarded_for_log_line"] = line
    assert f"{CLIENT_ADDRESS}:" in line  # the client, from X-Forwarded-For; nginx itself is 127.0.0.1
    assert "198.51.100.7" not in line  # a client cannot claim another address


def test_ui_loads_and_streams_through_the_proxy(proxied, client, results):
    page = client.get(proxied.base + "/ui/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    direct = httpx.get(proxied.app.url + "/ui/")
    assert page.headers.get("x-frame-options") == direct.headers.get("x-frame-options")  # nginx adds none
    assert page.headers.get("content-security-policy") == direct.headers.get("content-security-policy")
    from gradio_client import Client

    ui = Client(proxied.base + "/ui/", verbose=False, download_files=False, ssl_verify=False)
    job = ui.submit((REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8"), 24, 0.0,
                    api_name="/summarize")
    updates = list(job)
    assert len(updates) >= 2, "the UI's queue should stream the summary in parts through nginx"
    assert updates[-1][0]
    results["ui_stream_updates"] = len(updates)


def test_body_over_the_limit_gets_413(proxied, client, results):
    def body_of(size: int) -> bytes:
        payload = {"model": "thai-qwen-lora", "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}
        overhead = len(json.dumps(payload).encode())
        payload["messages"][0]["content"] = "a" * (size - overhead)
        data = json.dumps(payload).encode()
        assert len(data) == size
        return data

    headers = {"Content-Type": "application/json"}
    too_big = client.post(proxied.base + "/v1/chat/completions", content=body_of(BODY_LIMIT + 1), headers=headers)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "request_too_large"
    assert "client intended to send too large body" in proxied.nginx.error_log()  # nginx stopped it
    fits = client.post(proxied.base + "/v1/chat/completions", content=body_of(BODY_LIMIT), headers=headers)
    assert fits.status_code in (200, 400), fits.text  # the app answered (400: prompt longer than context)
    results["body_limit"] = {"limit": BODY_LIMIT, "over_limit_status": too_big.status_code,
                             "at_limit_status": fits.status_code}


def test_api_client_passes_through_the_proxy(proxied):
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "test_api_client.py"), "--url", proxied.base,
                             "--ca-bundle", str(proxied.cert)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "11 of 11 checks passed" in result.stdout
    time.sleep(API_BURST / API_RATE)  # let the rate-limit bucket drain for the next test


def test_requests_beyond_the_rate_limit_get_429(proxied, client, results):
    """nginx's bucket (rate r/s, burst b, nodelay) lets b + 1 requests through at once and r
    more each second after. Requests go out 3 x b at a time, so the bucket overflows however
    slowly this machine answers, and the count of 200s is checked against that rule for the
    time the requests took (no assumption about how fast they go)."""
    statuses, rejected = [], None
    started = time.monotonic()
    with ThreadPoolExecutor(3 * API_BURST) as pool:
        for _ in range(5):  # a round whose requests were too spread out to overflow: again
            for response in pool.map(lambda _: client.get(proxied.base + "/v1/models"),
                                     range(3 * API_BURST)):
                statuses.append(response.status_code)
                if response.status_code == 429 and rejected is None:
                    rejected = response
            if rejected is not None:
                break
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= API_BURST  # the burst is allowed
    assert statuses.count(200) <= API_BURST + 1 + API_RATE * elapsed, (statuses, elapsed)
    assert rejected is not None, statuses
    assert rejected.json()["error"]["code"] == "rate_limit_exceeded"
    assert rejected.headers["retry-after"] == "1"
    results["rate_limit"] = {"rate_per_s": API_RATE, "burst": API_BURST, "sent": len(statuses),
                             "ok": statuses.count(200), "rejected_429": statuses.count(429)}
    time.sleep(API_BURST / API_RATE)
