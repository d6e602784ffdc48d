"""The protected UI attacked as a browser and a log forger would: log lines forged through
Gradio's own tracebacks, a key in a query string reaching the access log, a cross-site
upload riding on the browser's cached Basic credentials (CSRF), and a forged Host that
Gradio turned into the page's root URL. One real server (``python app.py``)."""

from __future__ import annotations

import base64
import io
import logging
import re
import traceback

import httpx
import pytest

from tests.support import start_server

KEY = "ui-door-key-0123456789abcdef"
PORTAL = "https://portal.example"
UI = "/ui/gradio_api"
FORGED = "CRITICAL forged"


def basic(key: str = KEY) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"analyst:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def protected(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": KEY, "THAI_PROTECT_UI": "true",
           "THAI_FRAME_ANCESTORS": PORTAL, "THAI_ALLOWED_HOSTS": "127.0.0.1,localhost",
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "0", "OMP_NUM_THREADS": "1"}
    server = start_server(env, tmp_path_factory.mktemp("ui-door"))
    yield server
    server.stop()


def dependency(server, name: str) -> dict:
    config = httpx.get(server.url + "/ui/config", headers=basic()).json()
    return next(d for d in config["dependencies"] if d.get("api_name") == name)


def raise_in_gradio(server, value) -> int:
    """Call functions with a value their input component cannot take: Gradio prints the
    tracebacks itself, the value in the exception's message (the radio's in whole)."""
    statuses = []
    for name, data in (("load_example", [value]), ("lambda", [value, 3])):
        fn = dependency(server, name)
        r = httpx.post(f"{server.url}{UI}/run/predict", headers=basic(), timeout=60, json={
            "fn_index": fn["id"], "data": data, "session_hash": "forger", "event_data": None})
        statuses.append(r.status_code)
    return min(statuses)


# --- log forging (item: Gradio's prints pass the sanitizer) -----------------------------------


def test_gradio_tracebacks_cannot_start_a_log_line(protected):
    assert raise_in_gradio(protected, f"x\n{FORGED}\r\n{FORGED} again") >= 400
    log = protected.log()
    assert "forged" in log  # the traceback was written, as escaped text...
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(FORGED)]  # ...never as a line
    traceback_lines = [line for line in lines if "thai.stderr" in line]
    assert traceback_lines and all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in traceback_lines)


def test_a_megabyte_payload_is_cut_in_gradio_tracebacks(protected):
    before = len(protected.log())
    marker = "Z" * 1_500_000
    assert raise_in_gradio(protected, marker) >= 400
    added = protected.log()[before:]
    assert "ZZZZ" in added and "characters cut" in added
    assert marker[:100_000] not in added
    assert len(added) < 200_000  # a few cut records, not 1.5 MB (twice, repr and message)


def test_keys_in_query_strings_are_masked_in_the_access_log(protected):
    for name in ("api_key", "key", "token"):
        r = httpx.get(f"{protected.url}/v1/models?{name}=querysecret{name}&x=1")
        assert r.status_code == 401
    log = protected.log()
    assert "querysecret" not in log
    assert "/v1/models?api_key=***&x=1" in log


def test_logging_stream_makes_each_print_one_record():
    """In-process: what traceback.print_exc and print write becomes escaped records."""
    from api.log_streams import LoggingStream
    from api.middleware import SafeLogFilter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SafeLogFilter())
    logger = logging.getLogger("test.door.stream")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        stream = LoggingStream(logger, logging.WARNING, out)
        try:
            raise ValueError(f"bad\n{FORGED}")
        except ValueError:
            traceback.print_exc(file=stream)
        print("half", end="", file=stream)
        print(f" line\n{FORGED}", file=stream)
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("WARNING test.door.stream: ") for line in lines)
    assert f"WARNING test.door.stream: ValueError: bad\\n{FORGED}" in lines
    assert f"WARNING test.door.stream: half line\\n{FORGED}" in lines


# --- CSRF with Basic credentials --------------------------------------------------------------


def upload(server, headers: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{UI}/upload", headers={**basic(), **headers}, timeout=30,
                      files={"files": ("note.txt", "ข่าววันนี้".encode())})


def test_cross_site_upload_with_basic_credentials_is_refused(protected):
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Referer": "https://evil.example/page.html"},
                    {"Origin": "http://127.0.0.1.evil.example"}):
        r = upload(protected, headers)
        assert r.status_code == 403, headers
        assert r.json()["error"]["code"] == "cross_site_request"
    assert "refused a POST to the UI with Basic credentials" in protected.log()


def test_same_origin_and_frame_ancestor_uploads_are_accepted(protected):
    own = protected.url  # http://127.0.0.1:PORT, as the page itself sends it
    for headers in ({"Origin": own}, {"Origin": PORTAL}, {"Referer": own + "/ui/"},
                    {"Sec-Fetch-Site": "same-origin"}, {}):  # {}: a script, not a browser
        r = upload(protected, headers)
        assert r.status_code == 200, (headers, r.text)
    # Bearer keys are never sent by a browser on its own: no origin check.
    r = httpx.post(f"{protected.url}{UI}/upload", timeout=30, files={"files": ("a.txt", b"x")},
                   headers={"Authorization": f"Bearer {KEY}", "Origin": "https://evil.example"})
    assert r.status_code == 200
    # Reading is not changing: a cross-site GET still works (the frame policy governs pages).
    r = httpx.get(protected.url + "/ui/config", headers={**basic(), "Origin": "https://evil.example"})
    assert r.status_code == 200


# --- the root URL and the Host header ---------------------------------------------------------


def test_ui_root_is_relative_and_unknown_hosts_are_refused(protected):
    port = protected.url.rsplit(":", 1)[1]
    for path in ("/ui/config", "/ui/"):
        r = httpx.get(protected.url + path, headers={**basic(), "Host": f"localhost:{port}"})
        assert r.status_code == 200
        assert re.search(r'"root":\s*"/ui"', r.text), r.text[:300]
        assert '"http://localhost' not in r.text  # no URL value (the API page's curl
        # snippets, text for a reader, still name the host they were asked under)
    for host in ("evil.example", f"evil.example:{port}"):
        r = httpx.get(protected.url + "/ui/config", headers={**basic(), "Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
        assert "evil" not in r.text
    # Probes answer whatever Host a health checker uses.
    assert httpx.get(protected.url + "/health", headers={"Host": "10.1.2.3"}).status_code == 200


def test_foreign_origin_rules():
    from api.security import foreign_origin

    allowed = frozenset({PORTAL})

    def check(**headers: str) -> str | None:
        scope = {"headers": [(k.replace("_", "-").lower().encode(), v.encode())
                             for k, v in headers.items()]}
        return foreign_origin(scope, allowed)

    assert check(host="thai.example", origin="https://thai.example") is None
    assert check(host="thai.example", origin="https://thai.example:443") is None
    assert check(host="thai.example:8001", origin="http://thai.example:8001") is None
    assert check(host="127.0.0.1:8001", x_forwarded_host="public.example",
                 origin="https://public.example") is None  # behind the trusted proxy
    assert check(host="thai.example", origin=PORTAL + "/") is None
    assert check(host="thai.example", referer="https://thai.example/ui/?x=1") is None
    assert check(host="thai.example") is None  # nothing says: not a browser's cross-site post
    assert check(host="thai.example", origin="https://evil.example") == "https://evil.example"
    assert check(host="thai.example", origin="http://thai.example:8080") is not None
    assert check(host="thai.example", origin="null") == "null"
    assert check(host="thai.example", sec_fetch_site="cross-site") == "cross-site"
    assert check(host="thai.example", referer="https://evil.example/a") == "https://evil.example"
