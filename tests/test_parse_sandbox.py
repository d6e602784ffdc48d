"""Uploaded files are parsed in a sandbox: a pool of worker processes with memory and CPU
limits, killed and replaced when a file overruns them, with a bound on jobs per client
(:mod:`api.documents.pool`), and counts checked before trees are built.

The hostile files are the ones a review sent (built here): a .docx whose document.xml is
60 MiB of tiny paragraphs (it cost the serving process 35 s of CPU and 1.2 GB that was never
given back), a one-page PDF whose form XObjects draw each other 10 times 10 deep (119 s and
+1.57 GB), a CSV with 200,000 columns (450 s in the UI's one file process, a victim's .txt
failing behind it). Costs are CPU seconds and RSS read from /proc, never wall-clock times.
"""

from __future__ import annotations

import io
import os
import random
import resource
import signal
import threading
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from api.batch.formats import MAX_COLUMNS, BatchUsageError, TableInput
from api.documents.errors import (
    DocumentLimitError,
    DocumentTooComplexError,
    ParseBusyError,
    ParseQueueFullError,
)
from api.documents.extract import extract_document
from api.documents.pool import ParsePool
from tests.support import ServerProcess, proc_cost, run_python, start_server

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pages": 300}
VICTIM_TEXT = ("ข่าววันนี้ ฝนตกหนักในกรุงเทพมหานคร น้ำท่วมหลายพื้นที่ "
               "ประชาชนควรหลีกเลี่ยงการเดินทาง\n").encode()


# ------------------------------------------------------------ hostile files
def fanout_pdf(fan: int = 10, depth: int = 10) -> bytes:
    """One page drawing a form XObject ``fan`` times, which draws the next one ``fan``
    times, ``depth`` deep (fan ** depth forms drawn), the deepest showing a word: < 4 KB."""
    draw = b"q /X Do Q\n" * fan
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font "
               b"<< /F1 4 0 R >> /XObject << /X 6 0 R >> >> /Contents 5 0 R >>",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Length %d >>\nstream\n" % len(draw) + draw + b"\nendstream"]
    for level in range(depth):
        last = level == depth - 1
        body = b"BT /F1 12 Tf 72 700 Td (hello) Tj ET\n" if last else draw
        xobject = b"" if last else b" /XObject << /X %d 0 R >>" % (7 + level)
        objects.append(b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] /Resources << "
                       b"/Font << /F1 4 0 R >>" + xobject + b" >> /Length %d >>\nstream\n"
                       % len(body) + body + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


def dense_docx(mebibytes: int = 60) -> bytes:
    """A .docx whose word/document.xml is ``mebibytes`` MiB of tiny paragraphs: about
    0.5 MB, each part under the 64 MiB and ratio-200 zip-bomb limits."""
    rng = random.Random(7)
    words = [b"%x" % rng.getrandbits(16) for _ in range(512)]
    head = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<w:document xmlns:w='
            b'"http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>')
    paragraph = b"<w:p><w:r><w:t>%s</w:t></w:r></w:p>"
    count = mebibytes * 1024 * 1024 // len(paragraph % words[0])
    body = b"".join(paragraph % words[i % 509] for i in range(count))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", (
            '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org'
            '/package/2006/content-types"><Default Extension="rels" ContentType="application/'
            'vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType='
            '"application/xml"/><Override PartName="/word/document.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'))
        archive.writestr("_rels/.rels", (
            '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
            'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://'
            'schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
            'Target="word/document.xml"/></Relationships>'))
        archive.writestr("word/document.xml", head + body + b"</w:body></w:document>")
    return out.getvalue()


def wide_csv(columns: int = 200_000) -> bytes:
    return (",".join(f"c{i}" for i in range(columns)) + "\n" + ",".join("x" * columns) + "\n").encode()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------ jobs (the workers import them)
def double(x: int) -> int:
    return 2 * x


def worker_pid() -> int:
    return os.getpid()


def allocate(mib: int) -> int:
    block = bytearray(mib * 1024 * 1024)
    return len(block)


def forge_log_lines(text: str) -> str:
    """What a parser does with a hostile file's text: warn about it, print it."""
    import logging as logging_
    import sys as sys_

    logging_.getLogger("pypdf").warning("bad object %s", text)
    print(text, file=sys_.stderr)
    sys_.stderr.flush()
    return "done"


def spin() -> None:
    while True:
        pass


def hold(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(30)


def limits() -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"as": resource.getrlimit(resource.RLIMIT_AS),
            "cpu": resource.getrlimit(resource.RLIMIT_CPU),
            "used": usage.ru_utime + usage.ru_stime}


def refuse() -> None:
    raise DocumentTooComplexError("too complex to read")


@pytest.fixture
def pool():
    made: list[ParsePool] = []

    def build(**kwargs) -> ParsePool:
        made.append(ParsePool(**{"workers": 1, "timeout_s": 30, **kwargs}))
        return made[-1]

    yield build
    for p in made:
        p.close()


# ------------------------------------------------------------ the pool
def test_each_worker_limits_its_address_space_and_cpu(pool):
    p = pool(memory_mb=512, timeout_s=7)
    seen = p.call("a", limits)
    assert seen["as"] == (512 * 1024 * 1024, 512 * 1024 * 1024)
    soft_cpu = seen["cpu"][0]
    assert seen["used"] < soft_cpu <= seen["used"] + 7 + 1


def test_a_job_beyond_the_memory_limit_is_killed_and_the_next_runs(pool):
    p = pool(memory_mb=300)
    first = p.call("a", worker_pid)
    with pytest.raises(DocumentLimitError, match="THAI_PARSE_MEMORY_MB") as refused:
        p.call("a", allocate, 600)
    assert refused.value.status_code == 422 and "300 MiB" in refused.value.message
    assert not os.path.exists(f"/proc/{first}")  # killed and reaped
    assert p.call("a", double, 21) == 42
    assert p.call("a", worker_pid) != first


def test_a_job_past_its_time_is_killed_and_the_next_runs(pool):
    # 8 s, not less: the next job's fresh worker must start within it on a busy machine
    p = pool(timeout_s=8)
    first = p.call("a", worker_pid)
    with pytest.raises(DocumentLimitError, match="THAI_PARSE_TIMEOUT_S") as refused:
        p.call("a", spin)
    assert refused.value.status_code == 422 and "8 s" in refused.value.message
    assert not os.path.exists(f"/proc/{first}")
    assert p.call("b", double, 4) == 8 and p.call("b", worker_pid) != first


def test_a_worker_that_dies_is_replaced_and_its_death_explained(pool):
    p = pool()
    with pytest.raises(DocumentLimitError, match="CPU.*THAI_PARSE_TIMEOUT_S"):
        p.call("a", signal_self, signal.SIGXCPU)
    with pytest.raises(DocumentLimitError, match="THAI_PARSE_MEMORY_MB"):
        p.call("a", signal_self, signal.SIGKILL)  # as the kernel's OOM killer does
    assert p.call("a", double, 1) == 2


def test_a_jobs_own_error_crosses_intact_and_keeps_the_worker(pool):
    p = pool()
    first = p.call("a", worker_pid)
    with pytest.raises(DocumentTooComplexError, match="too complex to read") as refused:
        p.call("a", refuse)
    assert refused.value.code == "document_too_complex"
    assert p.call("a", worker_pid) == first


def test_a_clients_slot_is_free_once_its_result_is_seen(pool):
    """A visitor who gets a file's text and at once sends the next is not told it is busy:
    the slot is freed before the result is handed over, and a job cancelled while it
    waited (its caller went away) frees its slot too."""
    p = pool(workers=1, max_waiting=1)
    for value in range(5):
        assert p.call("a", double, value) == 2 * value
        assert p.jobs_of("a") == 0
    held = p.submit("a", hold, 2, "a")
    waiting = p.submit("b", double, 1)
    assert waiting.cancel() and p.jobs_of("b") == 0
    assert held.result(timeout=120) == "a" and p.jobs_of("a") == 0
    assert p.call("b", double, 3) == 6


def test_jobs_per_client_and_waiting_jobs_are_bounded(pool):
    p = pool(workers=2, jobs_per_client=1, max_waiting=0)
    held = p.submit("a", hold, 3, "a")
    with pytest.raises(ParseBusyError, match="THAI_PARSE_JOBS_PER_CLIENT") as busy:
        p.submit("a", double, 1)
    assert busy.value.status_code == 429 and busy.value.retry_after
    other = p.submit("b", hold, 3, "b")  # another client is not refused
    with pytest.raises(ParseQueueFullError, match="THAI_PARSE_MAX_WAITING"):
        p.submit("c", double, 1)  # both workers busy, no room to wait
    assert held.result() == "a" and other.result() == "b"
    assert p.jobs_of("a") == 0
    assert p.call("a", double, 2) == 4  # its slot came back with its job's end


# ------------------------------------------------------------ counts before trees
def test_a_dense_docx_is_refused_from_its_counts_before_a_tree_is_built():
    data = dense_docx()
    assert len(data) < 2 * 1024 * 1024
    before = cpu_seconds()
    with pytest.raises(DocumentTooComplexError, match="paragraphs, runs and table cells"):
        extract_document(data, "dense.docx", **LIMITS)
    assert cpu_seconds() - before < 5  # was 35 s and 1.2 GB


def test_a_pdf_whose_forms_fan_out_is_refused_inside_its_page():
    data = fanout_pdf()
    assert len(data) < 4096
    before = cpu_seconds()
    with pytest.raises(DocumentTooComplexError, match="page 1 draws more than"):
        extract_document(data, "fan.pdf", **LIMITS)
    assert cpu_seconds() - before < 15  # was 119 s and 1.57 GB
    # a modest fan-out (10 x 10 forms) is read
    assert extract_document(fanout_pdf(10, 2), "small.pdf", **LIMITS).text.startswith("hello")


def test_a_wide_table_is_refused_in_linear_time(tmp_path: Path):
    path = tmp_path / "wide.csv"
    path.write_bytes(wide_csv())
    before = cpu_seconds()
    with pytest.raises(BatchUsageError, match="200,000 columns"):
        TableInput(path)
    assert cpu_seconds() - before < 2  # was ~450 s (a count per column)
    path.write_text(",".join(f"c{i}" for i in range(MAX_COLUMNS)) + ",text\nx\n")
    with pytest.raises(BatchUsageError, match=f"{MAX_COLUMNS + 1:,} columns"):
        TableInput(path)
    path.write_text(",".join(["same"] * MAX_COLUMNS) + "\n")
    with pytest.raises(BatchUsageError, match="more than one column named 'same'"):
        TableInput(path)
    path.write_text("text" + "," * 100_000 + "\nhello\n")  # trailing empty header cells
    assert TableInput(path).columns == ["text"]


# ------------------------------------------------------------ through a real server
ATTACKER, VICTIM = "127.0.0.2", "127.0.0.3"  # other loopback addresses stand for other clients
UI = "/ui/gradio_api"


def client_at(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120)


def summarize_file(client: httpx.Client, url: str, name: str, data: bytes) -> httpx.Response:
    return client.post(url + "/v1/summarize/document", files={"file": (name, data)},
                       data={"max_tokens": "8", "temperature": "0"})


@pytest.fixture(scope="module")
def server(model_env, tmp_path_factory):
    env = {**model_env, "THAI_ENABLE_UI": "true", "THAI_PARSE_WORKERS": "2",
           "THAI_RATE_LIMIT_PER_MINUTE": "0"}
    process = start_server(env, tmp_path_factory.mktemp("parse-sandbox"))
    yield process
    process.stop()


def call_in_session(url: str, api_name: str, data: list, address: str) -> str:
    """A queued UI event, as the page sends it, from ``address``; the raw event stream."""
    config = httpx.get(url + "/ui/config").json()
    fn = next(d for d in config["dependencies"] if d["api_name"] == api_name)
    session = uuid.uuid4().hex
    with client_at(address) as client:
        r = client.post(f"{url}{UI}/queue/join", json={
            "fn_index": fn["id"], "data": data, "session_hash": session, "event_data": None,
            "trigger_id": None})
        assert r.status_code == 200, r.text
        out = []
        with client.stream("GET", f"{url}{UI}/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                out.append(line)
                if "process_completed" in line:
                    break
    return "\n".join(out)


def upload(url: str, name: str, data: bytes, address: str) -> dict:
    with client_at(address) as client:
        r = client.post(f"{url}{UI}/upload", files={"files": (name, data)})
    assert r.status_code == 200, r.text
    (token,) = r.json()
    return {"path": token, "meta": {"_type": "gradio.FileData"}, "orig_name": name}


def test_hostile_files_are_refused_and_leave_the_server_as_it_was(server: ServerProcess):
    docx, pdf, csv = dense_docx(), fanout_pdf(), wide_csv()
    with client_at(VICTIM) as victim:  # warm: the readers exist, the model and the UI ran once
        assert summarize_file(victim, server.url, "news.txt", VICTIM_TEXT).status_code == 200
        table = upload(server.url, "rows.csv", b"text\nhello\n", VICTIM)
        assert '"choices"' in call_in_session(server.url, "batch_columns", [table], VICTIM)
        cpu_before, rss_before = proc_cost(server.pid)

        answers: dict[str, httpx.Response | str] = {}

        def attack() -> None:
            with client_at(ATTACKER) as attacker:
                answers["docx"] = summarize_file(attacker, server.url, "dense.docx", docx)
                answers["pdf"] = summarize_file(attacker, server.url, "fan.pdf", pdf)
            table = upload(server.url, "wide.csv", csv, ATTACKER)
            answers["csv"] = call_in_session(server.url, "batch_columns", [table], ATTACKER)

        attacker_thread = threading.Thread(target=attack)
        attacker_thread.start()
        victims = [summarize_file(victim, server.url, "news.txt", VICTIM_TEXT) for _ in range(3)]
        attacker_thread.join(300)
        assert not attacker_thread.is_alive()
        victims.append(summarize_file(victim, server.url, "news.txt", VICTIM_TEXT))  # after

    for name in ("docx", "pdf"):
        answer = answers[name]
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        assert answer.json()["error"]["code"] == "document_too_complex", answer.text
    assert "process_completed" in answers["csv"] and "200,000" in answers["csv"], answers["csv"][-500:]
    for answer in victims:
        assert answer.status_code == 200, answer.text
        assert answer.json()["summary"] and answer.json()["document"]["filename"] == "news.txt"

    cpu_after, rss_after = proc_cost(server.pid)
    print(f"serving process: +{cpu_after - cpu_before:.2f} CPU s, RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB")
    # The serving process only received the files: no tree, no parse. (On the code before,
    # the .docx alone cost it 35 s and +1.2 GB, the PDF 119 s and +1.57 GB.)
    assert rss_after - rss_before < 32 * 1024 * 1024, (rss_before, rss_after)
    assert cpu_after - cpu_before < 20, (cpu_before, cpu_after)


def test_one_clients_second_file_waits_its_turn(server: ServerProcess):
    """A client's files are read one at a time (THAI_PARSE_JOBS_PER_CLIENT=1): a second one
    sent while the first is read gets 429; other clients are not affected."""
    answers: list[tuple[int, str]] = []
    pdf = fanout_pdf()

    def send() -> None:
        with client_at("127.0.0.4") as attacker:
            answer = summarize_file(attacker, server.url, "fan.pdf", pdf)
        answers.append((answer.status_code, answer.json()["error"]["code"]))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    with client_at(VICTIM) as victim:
        assert summarize_file(victim, server.url, "news.txt", VICTIM_TEXT).status_code == 200
    for thread in threads:
        thread.join(120)
    assert len(answers) == 4 and set(answers) <= {(400, "document_too_complex"),
                                                  (429, "too_many_parse_jobs")}, answers


def process_ended(pid: int, within_s: float = 20.0) -> bool:
    """True once ``pid`` is gone or a zombie (killed, not yet reaped)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


FORGED = "x\nCRITICAL thai.api [-]: forged\x1b[2J"


def assert_sanitized(stderr: str) -> None:
    assert "forged" in stderr  # the text is there, as data
    assert not any(line.startswith("CRITICAL") for line in stderr.splitlines())
    assert "\x1b" not in stderr


def test_what_a_reader_prints_or_logs_is_one_escaped_line():
    """Readers inherit the server's stderr but not its logging: a parser's warning quoting a
    hostile file used to reach the log raw, a forged line included. In a process of its own,
    as the server is: readers write to the stderr the forkserver was started with, the
    process's own, which pytest's per-test capture would not see once another test had
    started the forkserver in this worker."""
    probe = ("from api.documents.pool import ParsePool\n"
             "from tests.test_parse_sandbox import FORGED, forge_log_lines\n"
             "pool = ParsePool(workers=1, timeout_s=30)\n"
             "print(pool.call('a', forge_log_lines, FORGED))\n"
             "pool.close()\n")
    result = run_python(probe, timeout=300)
    assert result.stdout.split() == ["done"], result.stdout + result.stderr
    assert_sanitized(result.stderr)


def test_what_the_ui_helper_prints_or_logs_is_one_escaped_line(capfd):
    from thai_ui.worker_process import SpawnedWorker

    worker = SpawnedWorker("test")
    try:
        assert worker.call(forge_log_lines, FORGED, timeout=120) == "done"
    finally:
        worker.close()
    assert_sanitized(capfd.readouterr().err)


def test_the_ui_helper_process_is_killed_when_a_job_overruns():
    """The live counters' process (thai_ui.worker_process): a timeout used to abandon the
    wait but not the job, which went on costing a core, with every later job behind it."""
    from thai_ui.worker_process import SpawnedWorker

    worker = SpawnedWorker("test")
    try:
        first = worker.call(worker_pid, timeout=120)
        with pytest.raises(TimeoutError):
            worker.call(spin, timeout=2)
        assert process_ended(first)
        assert worker.call(double, 5, timeout=120) == 10
        assert worker.call(worker_pid, timeout=120) != first
    finally:
        worker.close()


@pytest.fixture(scope="module")
def strict_server(model_env, tmp_path_factory):
    """One reader and a one-second limit: a file that needs longer is killed mid-parse."""
    env = {**model_env, "THAI_ENABLE_UI": "false", "THAI_PARSE_WORKERS": "1",
           "THAI_PARSE_TIMEOUT_S": "1"}
    process = start_server(env, tmp_path_factory.mktemp("parse-strict"))
    yield process
    process.stop()


def test_a_file_past_the_time_limit_is_killed_and_the_next_file_is_read(strict_server):
    """A .docx within the counts that takes seconds to read (~120,000 paragraphs): its reader
    is killed at THAI_PARSE_TIMEOUT_S, the answer says so, and the next file gets a new one."""
    url = strict_server.url
    with client_at(VICTIM) as victim:
        assert summarize_file(victim, url, "news.txt", VICTIM_TEXT).status_code == 200
    with client_at(ATTACKER) as attacker:
        answer = summarize_file(attacker, url, "slow.docx", dense_docx(4))
    assert answer.status_code == 422, answer.text
    assert "THAI_PARSE_TIMEOUT_S" in answer.json()["error"]["message"]
    assert "its process was killed" in strict_server.log()
    with client_at(VICTIM) as victim:
        again = summarize_file(victim, url, "news.txt", VICTIM_TEXT)
    assert again.status_code == 200 and again.json()["summary"], again.text
