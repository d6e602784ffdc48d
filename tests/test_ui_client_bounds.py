"""Per-client bounds of the public UI: one client's uploads and batches leave room for others.

One anonymous address used to fill the whole upload quota (13 uploads of 20 MB: every
visitor got 507 for an hour) and to hold every batch slot with invented session hashes.
Unit tests of the bookkeeping, then the attack through a real server from two local
addresses (127.0.0.x: the server counts clients by address when no key is sent).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
import uuid

import httpx
import pytest

from tests.support import start_server

KEY = "ui-clients-key-" + "0123456789abcdef"
UI = "/ui/gradio_api"
FILE_META = {"_type": "gradio.FileData"}
MB = 1_000_000


# ======================================================================= unit
def test_upload_store_counts_each_client_apart(tmp_path):
    from thai_ui.uploads import UploadStore

    store = UploadStore(tmp_path, quota_bytes=10_000, ttl_s=100, client_quota_bytes=3_000)
    store.prepare()
    assert UploadStore(tmp_path, quota_bytes=500, ttl_s=1, client_quota_bytes=3_000) \
        .client_quota_bytes == 500  # never more than the whole

    def put(client: str, name: str, size: int):
        path = store.dir / uuid.uuid4().hex / name
        path.parent.mkdir()
        path.write_bytes(b"x" * size)
        store.record(client, path)
        return path

    first = put("ip-a", "1.bin", 2_000)
    assert store.client_usage("ip-a") == 2_000 and store.client_usage("ip-b") == 0
    assert store.room_for("ip-a", 1_000) is None and store.room_for("ip-a", 1_001) == "client"
    assert store.room_for("ip-b", 3_000) is None
    with store.reserve("ip-a", 900):  # an upload in progress holds its share
        assert store.room_for("ip-a", 101) == "client" and store.room_for("ip-a", 100) is None
        with store.reserve("ip-b", 2_500):  # 10,000 - 2,000 - 900 - 2,500 left in all
            assert store.room_for("ip-c", 3_000) is None
            with store.reserve("ip-c", 2_000):
                assert store.room_for("ip-d", 2_601) == "server"
                assert store.room_for("ip-d", 2_600) is None
    assert store._reserved == {}
    # The whole quota still holds across clients.
    for client in ("ip-c", "ip-d"):
        put(client, "f.bin", 3_000)
    assert store.room_for("ip-e", 2_001) == "server" and store.room_for("ip-e", 2_000) is None
    # Retry-After: when the client's oldest file expires; the sweeper frees the share.
    now = time.time()
    os.utime(first, (now - 90, now - 90))
    assert 1 <= store.client_retry_after("ip-a", now) <= 11
    assert store.sweep(now + 20) == 1 and store.client_usage("ip-a") == 0
    assert "ip-a" not in store._owned and store.room_for("ip-a", 3_000) is None
    # Files it does not hold are never recorded.
    store.record("ip-a", "/etc/passwd")
    assert store.client_usage("ip-a") == 0


def test_batch_jobs_are_bounded_per_client():
    from thai_ui.batch import BatchBusy, BatchJobs

    jobs = BatchJobs(max_running=4, per_client=1)
    a1 = jobs.start("s1", "ip-a")
    with pytest.raises(BatchBusy) as busy:
        jobs.start("s1", "ip-a")
    assert busy.value.scope == "session"
    for session in ("s2", "s3", "invented"):  # new session hashes do not help
        with pytest.raises(BatchBusy) as busy:
            jobs.start(session, "ip-a")
        assert busy.value.scope == "client"
    others = [jobs.start(f"o{i}", f"ip-{i}") for i in range(3)]
    with pytest.raises(BatchBusy) as busy:
        jobs.start("late", "ip-z")
    assert busy.value.scope == "server"
    jobs.finish(a1)
    assert jobs.start("s2", "ip-a").client == "ip-a"
    assert len(others) == 3 and jobs.running() == 4
    assert BatchJobs(max_running=4, per_client=9).per_client == 4


def test_client_of_a_gradio_request_is_the_guard_identity():
    from types import SimpleNamespace

    from thai_ui.handlers import _client_of

    scope = {"type": "http", "client": ("10.0.0.7", 5), "state": {}}
    assert _client_of(SimpleNamespace(request=SimpleNamespace(scope=scope))) == "ip-10.0.0.7"
    scope["state"]["client_id"] = "key-abc"
    assert _client_of(SimpleNamespace(request=SimpleNamespace(scope=scope))) == "key-abc"
    assert _client_of(SimpleNamespace(request=None, client=SimpleNamespace(host="10.0.0.8"))) \
        == "ip-10.0.0.8"
    assert _client_of(None) == "-"


# ================================================================ real server
@pytest.fixture(scope="module")
def door(model_env, tmp_path_factory):
    env = {**model_env, "THAI_API_KEYS": KEY,
           "THAI_UI_UPLOAD_DIR": str(tmp_path_factory.mktemp("client-uploads")),
           "THAI_UI_RATE_LIMIT_PER_MINUTE": "100000", "THAI_UI_RATE_LIMIT_BURST": "100000",
           "THAI_UI_UPLOAD_QUOTA_BYTES": str(30 * MB),
           "THAI_UI_UPLOAD_BYTES_PER_CLIENT": str(int(2.5 * MB)),
           "THAI_DOCUMENT_MAX_BYTES": str(int(1.1 * MB))}
    server = start_server(env, tmp_path_factory.mktemp("client-bounds"))
    yield server
    server.stop()


def client_at(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60)


def test_one_client_cannot_fill_the_upload_quota(door):
    """13 uploads from one address, at once: that client gets 429 past its share
    (2.5 MB here); another address still uploads, and so does the first one's neighbour."""
    attacker = client_at("127.0.0.2")

    def upload(i: int) -> httpx.Response:
        return attacker.post(f"{door.url}{UI}/upload",
                             files={"files": (f"big{i}.bin", os.urandom(MB))})

    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        answers = list(pool.map(upload, range(13)))
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) == 2 and statuses.count(429) == 11, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "client_upload_quota_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600 + 1
    # Sequentially too: still full.
    assert upload(99).status_code == 429
    for address in ("127.0.0.3", "127.0.0.1"):
        r = client_at(address).post(f"{door.url}{UI}/upload",
                                    files={"files": ("mine.txt", "ข่าววันนี้".encode())})
        assert r.status_code == 200, (address, r.text)
        assert r.json()[0].startswith("upload/")


# -------------------------------------------------------------------- batches
class QueuedCall:
    """A queued UI call from one address, its event stream read in a thread."""

    def __init__(self, url: str, client: httpx.Client, fn: dict, data: list,
                 session: str | None = None):
        self.url, self.client, self.session = url, client, session or uuid.uuid4().hex
        self.lines: list[str] = []
        self.done = threading.Event()
        r = client.post(f"{url}{UI}/queue/join", json={
            "fn_index": fn["id"], "data": data, "session_hash": self.session,
            "event_data": None, "trigger_id": None})
        assert r.status_code == 200, r.text
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self.client.stream("GET", f"{self.url}{UI}/queue/data",
                                    params={"session_hash": self.session}, timeout=120) as s:
                for line in s.iter_lines():  # Gradio closes it once the session has no event
                    self.lines.append(line)
                    if "close_stream" in line:
                        break
        finally:
            self.done.set()

    def wait_for(self, text: str, timeout: float = 90) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.done.is_set():
                return any(text in line for line in self.lines)
            time.sleep(0.05)
        return False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def start_batch(door, client: httpx.Client, deps: dict, file: dict) -> QueuedCall:
    """The page's order in a new session: the upload lists the columns, then run. The run
    joins once Gradio has closed the listing's stream: joined while that stream is closing,
    Gradio would drop the run with the disconnected stream (``clean_events``)."""
    listed = QueuedCall(door.url, client, deps["batch_columns"], [file])
    assert listed.done.wait(120) and '"choices"' in listed.text, listed.text[-1000:]
    return QueuedCall(door.url, client, deps["run_batch"], [file, "text", 64, 0.0], listed.session)


def test_one_client_runs_one_batch_whatever_its_sessions(door):
    """A client that invents session hashes still runs one batch at a time; another address
    is admitted beside it (the server's four slots are not all taken by the first)."""
    config = httpx.get(door.url + "/ui/config").json()
    deps = {d["api_name"]: d for d in config["dependencies"]}
    first, other = client_at("127.0.0.5"), client_at("127.0.0.6")
    table = ("text\n" + "".join(f"ข่าวที่ {i} วันนี้ฝนตกหนักในกรุงเทพ\n" for i in range(1000))).encode()
    r = first.post(f"{door.url}{UI}/upload", files={"files": ("rows.csv", table)})
    assert r.status_code == 200, r.text
    file = {"path": r.json()[0], "meta": FILE_META, "orig_name": "rows.csv"}
    running = start_batch(door, first, deps, file)
    # Running, so its table has been read: while it is read, the same client's next file (the
    # listing below) is refused as busy, one file at a time per visitor (test_parse_sandbox).
    assert running.wait_for('data-state=\\"running\\"'), running.text[-2000:]
    try:
        for _ in range(3):  # new session hashes from the same address
            second = start_batch(door, first, deps, file)
            assert second.wait_for("process_completed"), second.text[-2000:]
            assert "already have a batch running" in second.text, second.text[-2000:]
            assert "data-state" not in second.text
        assert not running.done.is_set(), "the first batch ended before the check: inconclusive"
        beside = start_batch(door, other, deps, file)
        assert beside.wait_for("data-state"), beside.text[-2000:]
        assert "already have a batch running" not in beside.text
    finally:
        for call, client in ((running, first), (locals().get("beside"), other)):
            if call is not None:
                client.post(f"{door.url}{UI}/run/predict", json={
                    "fn_index": deps["stop_batch"]["id"], "data": [],
                    "session_hash": call.session})
    for call in (running, beside):
        assert call.wait_for("process_completed", timeout=120), call.text[-2000:]
        assert 'data-state=\\"stopped\\"' in call.text or 'data-state=\\"done\\"' in call.text
