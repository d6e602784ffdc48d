"""``python -m api.batch``: file formats and resume without the engine, the runner with a fake
serving layer, and the real CLI on the demo checkpoint (JSONL, CSV, XLSX, interrupt + resume,
usage errors)."""

from __future__ import annotations

import asyncio
import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from api.batch.formats import (
    BatchRow,
    BatchUsageError,
    CsvSink,
    JsonlInput,
    JsonlSink,
    RowResult,
    TableInput,
    XlsxSink,
    batch_output_line,
    unique_keys,
)
from api.batch.runner import run_batch
from api.errors import error_body
from api.protocol_summarize import SummarizeRequest, SummarizeResponse, SummarizeUsage
from tests.support import REPO, ModuleRun, process_env, run_module

openpyxl = pytest.importorskip("openpyxl")

TEXTS = ["ข่าววันนี้เกี่ยวกับเศรษฐกิจไทยและการท่องเที่ยว", "สรุปประโยชน์ของการออกกำลังกาย",
         "ประเทศไทยมีจังหวัดกี่จังหวัด ตอบให้ละเอียด"]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
                            + "\n" for line in lines), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_xlsx(path: Path, header: list[str], rows: list[list]) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def read_xlsx(path: Path) -> list[list]:
    book = openpyxl.load_workbook(path, read_only=True)
    try:
        rows = [list(r) for r in book.worksheets[0].iter_rows(values_only=True)]
    finally:
        book.close()
    width = len(rows[0]) if rows else 0  # read-only mode leaves out empty cells at a row's end
    return [(r + [None] * width)[:width] for r in rows]


def summary_result(row: BatchRow, text: str = "สรุป") -> RowResult:
    body = SummarizeResponse(summary=text, model="m", finish_reason="stop",
                             usage=SummarizeUsage(input_tokens=1, output_tokens=1, total_tokens=2))
    return RowResult(row, 200, body.model_dump(mode="json"))


def error_result(row: BatchRow) -> RowResult:
    return RowResult(row, 400, error_body(400, "bad text", "invalid_request_error", "text"))


# ====================================================================== formats, no engine
def test_jsonl_lines_are_validated_like_the_http_api(tmp_path):
    chat = {"messages": [{"role": "user", "content": "สวัสดี"}], "max_tokens": 4}
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "sum", "method": "POST", "url": "/v1/summarize", "body": {"text": TEXTS[0]}},
        "",  # blank lines are not rows
        {"custom_id": "wrong-type", "method": "POST", "url": "/v1/summarize",
         "body": {"text": TEXTS[0], "max_tokens": "5"}},
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        {"custom_id": "embeddings", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "get", "method": "GET", "url": "/v1/summarize", "body": {"text": "x"}},
        {"custom_id": "stream", "method": "POST", "url": "/v1/chat/completions",
         "body": {**chat, "stream": True}},
        {"method": "POST", "url": "/v1/summarize", "body": {"text": "x"}},
        "{not json",
    ])
    rows = {row.key: row for row in JsonlInput(path).rows()}
    assert list(rows) == ["chat", "sum", "wrong-type", "no-messages", "embeddings", "get", "stream",
                          "line-9", "line-10"]
    assert rows["chat"].request.requested_max_tokens() == 4 and rows["chat"].error is None
    assert isinstance(rows["sum"].request, SummarizeRequest)
    status, body = rows["wrong-type"].error  # strict types: "5" is not a number, as over HTTP
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert body["error"]["type"] == "invalid_request_error"
    assert rows["no-messages"].error[1]["error"]["param"] == "messages"
    assert rows["embeddings"].error[0] == 404 and rows["get"].error[0] == 405
    assert rows["stream"].error[0] == 400 and rows["line-9"].error[1]["error"]["param"] == "custom_id"
    assert "not valid JSON" in rows["line-10"].error[1]["error"]["message"]
    assert unique_keys(JsonlInput(path).keys(), "custom_id") == set(rows)


def test_duplicate_ids_are_refused_up_front(tmp_path):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/summarize", "body": {"text": "x"}}
    path = write_jsonl(tmp_path / "in.jsonl", [line, {**line, "custom_id": "b"}, line])
    with pytest.raises(BatchUsageError, match=r"duplicate custom_id: 'a' \(line 1 and line 3\)"):
        unique_keys(JsonlInput(path).keys(), "custom_id")
    table = TableInput(write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "a"], ["1", "b"]]),
                       id_column="id")
    with pytest.raises(BatchUsageError, match=r"duplicate .*'1' \(row 2 and row 3\)"):
        unique_keys(table.keys(), "ids")


def test_table_text_column_choice_and_rows(tmp_path):
    assert TableInput(write_csv(tmp_path / "a.csv", ["id", "Text"], [])).text_column == "Text"
    assert TableInput(write_csv(tmp_path / "b.csv", ["body"], [])).text_column == "body"
    with pytest.raises(BatchUsageError, match=r"no column named 'text'.*'id', 'body'"):
        TableInput(write_csv(tmp_path / "c.csv", ["id", "body"], []))
    with pytest.raises(BatchUsageError, match=r"no column 'nope' \(--text-column\).*'id', 'body'"):
        TableInput(tmp_path / "c.csv", text_column="nope")
    (tmp_path / "d.csv").write_bytes(b"")
    with pytest.raises(BatchUsageError, match="is empty"):
        TableInput(tmp_path / "d.csv")
    with pytest.raises(BatchUsageError, match="empty header row"):
        TableInput(write_csv(tmp_path / "d2.csv", [], [["", ""]]))

    path = write_csv(tmp_path / "e.csv", ["text", "summary", "n"], [
        [TEXTS[0], "old", "1"], ["", "", ""], ["   ", "x", "2"], [TEXTS[1], "", "3", "extra"]])
    table = TableInput(path, max_tokens=7, temperature=0.0)
    assert table.output_columns == ["row", "text", "summary", "n", "summary_2", "error"]
    rows = list(table.rows())
    assert [r.row for r in rows] == [2, 4, 5]  # the blank row 3 is skipped, numbers kept
    assert rows[0].request.max_tokens == 7 and rows[0].request.temperature == 0.0
    assert rows[1].error is None  # only blank after normalizing: the serving layer's 400, as over HTTP
    assert "header names 3 columns" in rows[2].error[1]["error"]["message"]


def test_table_blank_text_is_a_row_error(tmp_path):
    table = TableInput(write_csv(tmp_path / "a.csv", ["id", "text"], [["1", ""], ["2", "x"]]))
    first, second = table.rows()
    assert first.error[0] == 400 and first.error[1]["error"]["param"] == "text"
    assert second.error is None and first.values == ["1", ""]


def test_batch_output_line_is_vllms_format():
    row = BatchRow("k1")
    ok, failed = batch_output_line(summary_result(row)), batch_output_line(error_result(row))
    for line in ok, failed:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["custom_id"] == "k1" and line["id"] != line["response"]["request_id"]
    assert ok["response"]["status_code"] == 200 and ok["error"] is None
    assert ok["response"]["body"]["summary"] == "สรุป"
    assert failed["response"] == {"status_code": 400, "request_id": failed["response"]["request_id"],
                                  "body": None}
    assert failed["error"]["error"]["param"] == "text"


def test_jsonl_resume_drops_a_cut_last_line_and_refuses_a_corrupt_middle(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = JsonlSink(out)
    assert sink.resume().keys == set()
    sink.open()
    sink.write(summary_result(BatchRow("a")))
    sink.write(error_result(BatchRow("b")))
    sink.close(complete=False)
    good = out.read_bytes()
    out.write_bytes(good + b'{"id": "x", "custom_id": "c", "resp')  # a kill mid-write
    resume = JsonlSink(out).resume()
    assert (resume.keys, resume.failed, resume.dropped_partial) == ({"a", "b"}, 1, True)
    assert out.read_bytes() == good  # truncated, so the next append starts a fresh line

    out.write_bytes(b"garbage\n" + good)
    with pytest.raises(BatchUsageError, match="line 1 is not a result line"):
        JsonlSink(out).resume()


def test_csv_sink_appends_and_resumes(tmp_path):
    table = TableInput(write_csv(tmp_path / "in.csv", ["id", "text"],
                                 [["a", TEXTS[0]], ["b", TEXTS[1]], ["c", 'say "hi",\nbye']]),
                       id_column="id")
    rows = list(table.rows())
    out = tmp_path / "out.csv"
    sink = CsvSink(out, table)
    sink.resume()
    sink.open()
    sink.write(summary_result(rows[2], "line one\nline two, \"quoted\""))
    sink.write(error_result(rows[0]))
    sink.close(complete=False)
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # Excel needs the BOM to read Thai
    records = list(csv.reader(open(out, encoding="utf-8-sig", newline="")))
    assert records[0] == ["row", "id", "text", "summary", "error"]
    assert records[1] == ["4", "c", 'say "hi",\nbye', 'line one\nline two, "quoted"', ""]
    assert records[2][:3] == ["2", "a", TEXTS[0]] and records[2][4].startswith("400 invalid_request")

    good = out.read_bytes()
    for cut in (b'3,b,"half a cell\n', b"3,b,no line end"):
        out.write_bytes(good + cut)
        resume = CsvSink(out, table).resume()
        assert (resume.keys, resume.failed, resume.dropped_partial) == ({"a", "c"}, 1, True)
        assert out.read_bytes() == good

    other = TableInput(table.path)  # keyed by row number: other columns than the file has
    other.output_columns = ["row", "text", "summary", "error"]
    with pytest.raises(BatchUsageError, match="other columns"):
        CsvSink(out, other).resume()


def test_xlsx_sink_sidecar_then_workbook_in_input_order(tmp_path):
    table = TableInput(write_xlsx(tmp_path / "in.xlsx", ["id", "text", "n"],
                                  [[10, TEXTS[0], 1.5], [11, TEXTS[1], None], [12, TEXTS[2], 3]]))
    assert table.text_column == "text"
    rows = list(table.rows())
    assert [r.key for r in rows] == ["2", "3", "4"] and rows[0].values == [10, TEXTS[0], 1.5]
    out = tmp_path / "out.xlsx"
    sink = XlsxSink(out, table)
    sink.resume()
    sink.open()
    sink.write(summary_result(rows[2], "\x01" + "x" * 40000))  # a control character; too long
    sink.write(summary_result(rows[0]))
    sink.close(complete=False)  # interrupted: the workbook has what finished, the sidecar stays
    assert sink.sidecar.exists()
    got = read_xlsx(out)
    assert got[0] == ["row", "id", "text", "n", "summary", "error"]
    assert [r[0] for r in got[1:]] == [2, 4] and got[1][1:4] == [10, TEXTS[0], 1.5]
    assert got[1][4:] == ["สรุป", None]
    assert got[2][4].startswith("xxx") and got[2][4].endswith("more characters]")
    assert len(got[2][4]) <= 32767

    sink = XlsxSink(out, table)
    assert sink.resume().keys == {"2", "4"}
    sink.open()
    sink.write(error_result(rows[1]))
    sink.close(complete=True)
    assert not sink.sidecar.exists()
    got = read_xlsx(out)
    assert [r[0] for r in got[1:]] == [2, 3, 4] and got[2][5].startswith("400")

    resume = XlsxSink(out, table).resume()  # no sidecar: rebuilt from the workbook
    assert (resume.keys, resume.failed) == ({"2", "3", "4"}, 1)


# ====================================================================== runner, fake serving
class FakeServing:
    """Answers after ``delay``; counts what is in flight and what was cancelled."""

    def __init__(self, delay: float = 0.01, overloaded: int = 0):
        self.delay, self.overloaded = delay, overloaded
        self.in_flight = self.most_in_flight = self.cancelled = self.calls = 0
        self.engine = self

    def failure(self):
        return None

    async def summarize(self, request: SummarizeRequest) -> SummarizeResponse:
        from api.engine.errors import EngineOverloadedError

        self.calls += 1
        if self.overloaded:
            self.overloaded -= 1
            raise EngineOverloadedError("queue full", retry_after=0)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        return SummarizeResponse(summary=request.text[::-1], model="m", finish_reason="stop",
                                 usage=SummarizeUsage(input_tokens=1, output_tokens=1, total_tokens=2))


class ListSink:
    def __init__(self):
        self.results: list[RowResult] = []

    def write(self, result: RowResult) -> None:
        self.results.append(result)


def summarize_rows(n: int, pulled: list[int] | None = None):
    for i in range(n):
        if pulled is not None:
            pulled.append(i)
        yield BatchRow(str(i), request=SummarizeRequest(text=f"text {i}"))


def test_runner_keeps_the_batch_full_and_pulls_rows_lazily():
    serving, sink, pulled, progress = FakeServing(), ListSink(), [], []

    async def main():
        rows = summarize_rows(50, pulled)
        task = asyncio.create_task(run_batch(serving, rows, sink, 8, lambda *a: progress.append(a),
                                             total=50))
        await asyncio.sleep(0.001)
        assert len(pulled) <= 9  # never the whole file at once
        return await task

    stats = asyncio.run(main())
    assert serving.most_in_flight == 8
    assert (stats.done, stats.failed, len(sink.results)) == (50, 0, 50)
    assert sorted(int(r.row.key) for r in sink.results) == list(range(50))
    assert progress[-1] == (50, 50, 0) and len(progress) == 50


def test_runner_retries_429_and_records_refused_rows():
    serving, sink = FakeServing(overloaded=2), ListSink()
    rows = [BatchRow("ok", request=SummarizeRequest(text="x")),
            BatchRow("bad", error=(400, error_body(400, "no", "invalid_request_error")))]
    stats = asyncio.run(run_batch(serving, rows, sink, 4))
    assert (stats.total, stats.done, stats.failed) == (2, 2, 1)
    by_key = {r.row.key: r for r in sink.results}
    assert by_key["ok"].ok and serving.calls == 3 and by_key["bad"].status == 400


def test_runner_cancel_writes_only_finished_rows():
    serving, sink = FakeServing(delay=0.2), ListSink()

    async def main():
        task = asyncio.create_task(run_batch(serving, summarize_rows(20), sink, 4))
        await asyncio.sleep(0.3)  # the first 4 finished, the next 4 are in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(sink.results) == 4 and serving.cancelled == 4 and serving.in_flight == 0


# ====================================================================== the CLI, real engine
def run_cli(args: list, env: dict, *, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_module("api.batch", args, env, timeout=timeout)


@pytest.fixture()
def batch_env(model_env) -> dict[str, str]:
    return process_env(**model_env, THAI_MAX_NEW_TOKENS="8", THAI_LOG_PROMPTS="false")


def output_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_jsonl_chat_and_summarize_rows_in_vllm_format(tmp_path, batch_env):
    chat = {"messages": [{"role": "system", "content": "ตอบสั้น ๆ"},
                         {"role": "user", "content": TEXTS[2]}], "max_tokens": 6}
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "sum-1", "method": "POST", "url": "/v1/summarize", "body": {"text": TEXTS[0]}},
        {"custom_id": "bad-1", "method": "POST", "url": "/v1/summarize", "body": {"text": " \u200b "}},
        {"custom_id": "bad-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "robot", "content": "x"}]}},
    ])
    out = tmp_path / "out.jsonl"
    done = run_cli([path, out], batch_env)
    assert done.returncode == 1, done.stderr  # some rows failed
    assert "2 of 4 rows failed" in done.stderr
    lines = {line["custom_id"]: line for line in output_lines(out)}
    assert set(lines) == {"chat-1", "sum-1", "bad-1", "bad-2"}
    for line in lines.values():
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert set(line["response"]) == {"status_code", "request_id", "body"}
    chat_body = lines["chat-1"]["response"]["body"]
    assert lines["chat-1"]["response"]["status_code"] == 200 and lines["chat-1"]["error"] is None
    assert chat_body["object"] == "chat.completion" and chat_body["usage"]["completion_tokens"] <= 6
    assert lines["sum-1"]["response"]["body"]["usage"]["output_tokens"] <= 8
    for key, param in (("bad-1", "text"), ("bad-2", "messages.0.role")):
        assert lines[key]["response"]["status_code"] == 400 and lines[key]["response"]["body"] is None
        assert lines[key]["error"]["error"]["type"] == "invalid_request_error"
        assert lines[key]["error"]["error"]["param"] == param


def test_cli_csv_200_rows(tmp_path, batch_env):
    path = write_csv(tmp_path / "docs.csv", ["doc_id", "text"],
                     [[f"d{i}", f"{TEXTS[i % 3]} ฉบับที่ {i}"] for i in range(200)])
    out = tmp_path / "summaries.csv"
    done = run_cli([path, out, "--max-tokens", "8", "--temperature", "0"], batch_env)
    assert done.returncode == 0, done.stderr
    rate = re.search(r"200 rows done in [\d.]+ s \(([\d.]+) rows/s\), 0 failed", done.stderr)
    assert rate, done.stderr
    print(f"\n200-row CSV on the demo checkpoint: {rate.group(1)} rows/s")
    records = list(csv.DictReader(open(out, encoding="utf-8-sig", newline="")))
    assert len(records) == 200
    assert sorted(int(r["row"]) for r in records) == list(range(2, 202))
    assert all(r["summary"] and not r["error"] for r in records)
    assert {r["doc_id"] for r in records} == {f"d{i}" for i in range(200)}

    again = run_cli([path, out], batch_env)  # resume with nothing left: no model load
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert "loading the model" not in again.stderr


def test_cli_interrupt_then_resume_does_every_row_once(tmp_path, batch_env):
    """SIGINT mid-run keeps the finished rows; the rerun skips them and does the rest."""
    n = 24
    body = {"messages": [{"role": "user", "content": TEXTS[0]}],
            "max_tokens": 48, "min_tokens": 48, "ignore_eos": True}  # a fixed cost per row
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i in range(n)])
    out = tmp_path / "out.jsonl"
    slow = {**batch_env, "THAI_MAX_BATCH_SIZE": "2", "THAI_MAX_WAITING": "0"}
    proc = ModuleRun("api.batch", [path, out], slow)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    first = output_lines(out)
    assert 3 <= len(first) < n, err
    assert all(line["response"]["status_code"] == 200 for line in first)
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"id": "batch-x", "custom_id": "r')  # as if killed mid-write

    done = run_cli([path, out], batch_env)
    assert done.returncode == 0, done.stderr
    assert f"{len(first)} already in {out} are skipped" in done.stderr
    assert "incomplete last line" in done.stderr
    assert f"{n - len(first)} rows done" in done.stderr
    ids = [line["custom_id"] for line in output_lines(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # every row, none twice
    assert ids[:len(first)] == [line["custom_id"] for line in first]


def test_cli_xlsx_in_and_out_with_sigterm_and_resume(tmp_path, batch_env):
    n = 16
    path = write_xlsx(tmp_path / "docs.xlsx", ["doc", "body", "pages"],
                      [[f"doc-{i}", f"{TEXTS[i % 3]} {i}", i] for i in range(n)])
    out = tmp_path / "summaries.xlsx"
    sidecar = tmp_path / "summaries.xlsx.progress.jsonl"
    args = [path, out, "--text-column", "body", "--id-column", "doc", "--max-tokens", "64"]
    slow = {**batch_env, "THAI_MAX_BATCH_SIZE": "1", "THAI_MAX_WAITING": "0",
            "THAI_NO_REPEAT_NGRAM_SIZE": "0"}
    proc = ModuleRun("api.batch", args, slow)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if sidecar.exists() and sidecar.read_text().count("\n") >= 3:  # header + 2 rows
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    partial = read_xlsx(out)  # written on the way out, from the sidecar
    assert partial[0] == ["row", "doc", "body", "pages", "summary", "error"]
    assert 2 <= len(partial) - 1 < n and sidecar.exists()

    done = run_cli(args, batch_env)
    assert done.returncode == 0, done.stderr
    assert f"{len(partial) - 1} already in" in done.stderr
    rows = read_xlsx(out)
    assert [r[0] for r in rows[1:]] == list(range(2, n + 2))  # input order
    assert [r[1] for r in rows[1:]] == [f"doc-{i}" for i in range(n)]
    assert [r[3] for r in rows[1:]] == list(range(n))  # numbers stay numbers
    assert all(r[4] and r[5] is None for r in rows[1:])
    assert not sidecar.exists()  # complete: the workbook is the whole result

    again = run_cli(args, batch_env)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert len(read_xlsx(out)) == n + 1


@pytest.mark.parametrize("case", ["missing column", "ambiguous column", "unknown extension",
                                  "duplicate ids", "empty file", "header only", "missing input",
                                  "jsonl to csv", "bad temperature"])
def test_cli_usage_errors_exit_2_before_loading_the_model(tmp_path, batch_env, case):
    good = write_csv(tmp_path / "in.csv", ["id", "text"], [["1", "ก"]])
    two = write_csv(tmp_path / "two.csv", ["id", "body"], [["1", "ก"]])
    line = {"custom_id": "same", "method": "POST", "url": "/v1/summarize", "body": {"text": "x"}}
    args, message = {
        "missing column": ([good, "o.csv", "--text-column", "body"], "no column 'body'.*'id', 'text'"),
        "ambiguous column": ([two, "o.csv"], "pass --text-column with one of: 'id', 'body'"),
        "unknown extension": ([good, "o.txt"], "unknown extension '.txt'"),
        "duplicate ids": ([write_jsonl(tmp_path / "d.jsonl", [line, line]), "o.jsonl"],
                          r"duplicate custom_id: 'same' \(line 1 and line 2\)"),
        "empty file": ([write_jsonl(tmp_path / "e.jsonl", []), "o.jsonl"], "has no rows"),
        "header only": ([write_csv(tmp_path / "h.csv", ["text"], []), "o.csv"], "has no rows"),
        "missing input": ([tmp_path / "nope.csv", "o.csv"], "does not exist"),
        "jsonl to csv": ([write_jsonl(tmp_path / "j.jsonl", [line]), "o.csv"], "needs a .jsonl OUTPUT"),
        "bad temperature": ([good, "o.csv", "--temperature", "3"],
                            "--temperature: .*less than or equal to 2"),
    }[case]
    args = [a if isinstance(a, Path) else (tmp_path / a if a.startswith("o.") else a) for a in args]
    done = run_cli(args, batch_env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "loading the model" not in done.stderr
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


def test_manage_sh_batch_help_and_settings_error(tmp_path, batch_env):
    helped = subprocess.run(["./manage.sh", "batch", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--text-column" in helped.stdout and "resume" in helped.stdout
    assert "batch INPUT OUTPUT" in subprocess.run(["./manage.sh", "help"], cwd=REPO,
                                                  capture_output=True, text=True).stdout
    good = write_csv(tmp_path / "in.csv", ["text"], [["ก"]])
    bad = run_cli([good, tmp_path / "o.csv"], {**batch_env, "THAI_MAX_BATCH_SIZE": "0"}, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "THAI_MAX_BATCH_SIZE" in bad.stderr
