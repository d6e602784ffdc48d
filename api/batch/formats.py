"""Batch files without the engine: reading requests, writing results as they finish, and
finding what an earlier run of the same INPUT and OUTPUT already finished (resume).

Inputs
  - ``.jsonl``: OpenAI's batch input format, one ``{"custom_id", "method", "url", "body"}`` per
    line, ``url`` being ``/v1/chat/completions`` or ``/v1/summarize``. Bodies are validated by the
    same pydantic models the HTTP routes use, so a line fails here exactly as its request would
    fail over HTTP (status and OpenAI error body), and a bad line never stops the others.
  - ``.csv`` / ``.xlsx``: one text per row, each row a ``/v1/summarize`` request. A row is known
    by its spreadsheet row number (the header is row 1) or by an id column.

Outputs (written one finished row at a time, flushed, so a kill loses only the rows in flight)
  - ``.jsonl``: the lines vLLM's ``run-batch`` writes (``id``, ``custom_id``, ``response``
    ``{status_code, request_id, body}``, ``error``), in the order rows finish.
  - ``.csv``: ``row``, the input columns, ``summary`` and ``error``, in the order rows finish.
  - ``.xlsx``: a workbook cannot be appended to safely, so finished rows go to a sidecar
    ``OUTPUT.progress.jsonl`` and the workbook is written from it (in input order) when the run
    ends or is interrupted; the sidecar is deleted once every row is done.

  Result files are opened in spreadsheets, and their cells come from anyone (the input's rows,
  the model's summaries): no text cell becomes a formula. In ``.csv`` a text starting with
  ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (OWASP's
  CSV-injection advice); in ``.xlsx`` every text is written as a string cell
  (:mod:`api.batch.cells`).

Resume: a row whose key (custom_id, id column or row number) is in OUTPUT is not run again. A
last line cut short by a kill is dropped (the file is truncated before it) and its row redone.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.batch.cells import csv_cell, csv_text, string_cells

# The HTTP API's own wording of a validation error, so a bad row reads like a 400 from the route.
from api.errors import _validation_message, error_body
from api.protocol import ChatCompletionRequest
from api.protocol_summarize import SummarizeRequest

CHAT_URL = "/v1/chat/completions"
SUMMARIZE_URL = "/v1/summarize"
REQUEST_MODELS: dict[str, type[BaseModel]] = {CHAT_URL: ChatCompletionRequest,
                                              SUMMARIZE_URL: SummarizeRequest}
FORMATS = ("jsonl", "csv", "xlsx")
XLSX_CELL_LIMIT = 32767  # Excel's most characters in one cell; longer text is cut, with a marker
MAX_COLUMNS = 1000  # a table's header; wider tables are refused (each row is copied per column)

csv.field_size_limit(2**31 - 1)  # the default (128 KiB) is below a 200,000-character Thai text


class BatchUsageError(Exception):
    """A problem with the files or options, not with a row: the CLI prints it and exits 2."""


@dataclass
class BatchRow:
    """One request of the batch. ``error`` is set when it was refused before the engine."""

    key: str  # custom_id, id-column value or row number: what resume matches on
    request: ChatCompletionRequest | SummarizeRequest | None = None
    error: tuple[int, dict] | None = None  # (status, OpenAI error body)
    row: int | None = None  # table input: the spreadsheet row number (header = 1)
    values: list[Any] | None = None  # table input: the row's cells, copied to a table output


@dataclass
class RowResult:
    row: BatchRow
    status: int
    body: dict  # the response body (status 200) or the OpenAI error body

    @property
    def ok(self) -> bool:
        return self.status == 200

    def summary(self) -> str:
        if not self.ok:
            return ""
        if "summary" in self.body:
            return self.body["summary"]
        return self.body["choices"][0]["message"]["content"]

    def error_text(self) -> str:
        if self.ok:
            return ""
        error = self.body.get("error", {})
        return f"{self.status} {error.get('type', 'error')}: {error.get('message', '')}"


def file_format(path: Path, what: str) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise BatchUsageError(f"{what} {path} has an unknown extension {path.suffix!r}: use "
                              ".jsonl (OpenAI batch format), .csv or .xlsx")
    return fmt


def invalid_request(exc: ValidationError) -> tuple[int, dict]:
    """The 400 the HTTP API answers for this validation error."""
    message, param = _validation_message(RequestValidationError(exc.errors(include_url=False)))
    return 400, error_body(400, message, "invalid_request_error", param)


def refused(status: int, message: str, param: str | None = None) -> tuple[int, dict]:
    return status, error_body(status, message, "invalid_request_error", param)


# ============================================================== JSONL input
class JsonlInput:
    """OpenAI batch input. Lines are parsed lazily, twice: once for the keys (duplicates,
    totals), once while running, so a 100,000-line file is never held in memory."""

    kind = "jsonl"

    def __init__(self, path: Path):
        self.path = path

    def _lines(self) -> Iterator[tuple[int, str]]:
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield number, line
        except UnicodeDecodeError as exc:
            raise BatchUsageError(f"{self.path} is not UTF-8 text ({exc.reason})") from None

    @staticmethod
    def _key(number: int, data: Any) -> str:
        custom_id = data.get("custom_id") if isinstance(data, dict) else None
        if isinstance(custom_id, str) and custom_id:
            return custom_id
        return f"line-{number}"  # a line without a usable custom_id still gets one error row

    def keys(self) -> Iterator[tuple[str, str]]:
        """(key, where) for every request line, in order."""
        for number, line in self._lines():
            try:
                data = json.loads(line)
            except ValueError:
                data = None
            yield self._key(number, data), f"line {number}"

    def rows(self) -> Iterator[BatchRow]:
        for number, line in self._lines():
            yield self._parse(number, line)

    def _parse(self, number: int, line: str) -> BatchRow:
        try:
            data = json.loads(line)
        except ValueError as exc:
            return BatchRow(f"line-{number}", error=refused(
                400, f"line {number} is not valid JSON: {exc}"))
        key = self._key(number, data)
        if not isinstance(data, dict):
            return BatchRow(key, error=refused(400, f"line {number} is not a JSON object"))
        if not isinstance(data.get("custom_id"), str) or not data["custom_id"]:
            return BatchRow(key, error=refused(
                400, f"line {number} has no custom_id (a non-empty string)", "custom_id"))
        url, method = data.get("url"), data.get("method", "POST")
        if url not in REQUEST_MODELS:
            return BatchRow(key, error=refused(
                404, f"url {str(url)[:200]!r} is not supported in a batch; use {CHAT_URL} "
                f"or {SUMMARIZE_URL}", "url"))
        if method != "POST":
            return BatchRow(key, error=refused(405, f"method {str(method)[:20]!r} is not "
                                                    "allowed; use POST", "method"))
        try:
            request = REQUEST_MODELS[url].model_validate(data.get("body"))
        except ValidationError as exc:
            return BatchRow(key, error=invalid_request(exc))
        if getattr(request, "stream", False):
            return BatchRow(key, error=refused(
                400, "stream: true is not supported in a batch; leave it out", "stream"))
        return BatchRow(key, request=request)


# ============================================================== table input
def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def _cell_value(value: Any) -> Any:
    """A cell as JSON can hold it (the sidecar), keeping numbers numbers for the workbook."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return cell_text(value)


def _csv_records(path: Path) -> Iterator[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.reader(f)
    except UnicodeDecodeError:
        raise BatchUsageError(f"{path} is not UTF-8 text; in Excel use Save As 'CSV UTF-8', "
                              "or give the .xlsx") from None
    except csv.Error as exc:
        raise BatchUsageError(f"{path} is not a readable CSV file: {exc}") from None


def _xlsx_records(path: Path) -> Iterator[list[Any]]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile.BadZipFile, InvalidFileException, KeyError...
        raise BatchUsageError(f"{path} is not a readable .xlsx workbook: {exc}") from None
    try:
        for values in book.worksheets[0].iter_rows(values_only=True):
            yield [_cell_value(v) for v in values]
    finally:
        book.close()


def read_records(path: Path) -> Iterator[list[Any]]:
    return _xlsx_records(path) if path.suffix.lower() == ".xlsx" else _csv_records(path)


def free_name(name: str, taken: list[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... when the input already has a column of that name."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


class TableInput:
    """CSV or XLSX: a header row, then one text per row, each a summarize request.

    Rows with every cell empty are skipped (spreadsheets often end with some); the others keep
    their spreadsheet row number, so ``row`` in the output points at the row an analyst sees.
    """

    kind = "table"

    def __init__(self, path: Path, text_column: str | None = None, id_column: str | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 model: str | None = None):
        self.path = path
        self.max_tokens, self.temperature, self.model = max_tokens, temperature, model
        header = next(iter(read_records(path)), None)
        if header is None:
            raise BatchUsageError(f"{path} is empty: it needs a header row and one row per text")
        width = len(header)
        while width and cell_text(header[width - 1]).strip() == "":
            width -= 1  # a formatted but empty cell right of the last column
        if width > MAX_COLUMNS:
            raise BatchUsageError(f"{path} has {width:,} columns in its header row; at most "
                                  f"{MAX_COLUMNS:,} are read (the text goes in one of them)")
        self.columns = [cell_text(name).strip() or f"column_{i + 1}"
                        for i, name in enumerate(header[:width])]
        if not self.columns:
            raise BatchUsageError(f"{path} has an empty header row: the first row names the columns")
        doubled = sorted(name for name, count in Counter(self.columns).items() if count > 1)
        if doubled:
            raise BatchUsageError(f"{path} has more than one column named {', '.join(map(repr, doubled))}")
        self.text_column = self._pick_text_column(text_column)
        self.id_column = self._check_column(id_column, "--id-column") if id_column else None
        self._text_at = self.columns.index(self.text_column)
        self._id_at = self.columns.index(self.id_column) if self.id_column else None
        # Output columns: where the row came from, the input, the result.
        self.row_column = free_name("row", self.columns)
        self.summary_column = free_name("summary", self.columns)
        self.error_column = free_name("error", self.columns + [self.summary_column])
        self.output_columns = [self.row_column, *self.columns, self.summary_column, self.error_column]

    def _listing(self) -> str:
        return ", ".join(repr(c) for c in self.columns)

    def _check_column(self, name: str, flag: str) -> str:
        if name not in self.columns:
            raise BatchUsageError(f"{self.path} has no column {name!r} ({flag}); its columns: "
                                  f"{self._listing()}")
        return name

    def _pick_text_column(self, wanted: str | None) -> str:
        if wanted:
            return self._check_column(wanted, "--text-column")
        named_text = [c for c in self.columns if c.casefold() == "text"]
        if len(named_text) == 1:
            return named_text[0]
        if len(self.columns) == 1:
            return self.columns[0]
        raise BatchUsageError(f"which column holds the text? {self.path} has no column named "
                              f"'text'; pass --text-column with one of: {self._listing()}")

    def _records(self) -> Iterator[tuple[int, list[Any]]]:
        records = iter(read_records(self.path))
        next(records, None)  # the header
        for number, values in enumerate(records, 2):
            if any(cell_text(v).strip() for v in values):
                yield number, values

    def _key(self, number: int, values: list[Any]) -> str:
        if self._id_at is None:
            return str(number)
        return cell_text(values[self._id_at] if self._id_at < len(values) else None).strip()

    def keys(self) -> Iterator[tuple[str, str]]:
        for number, values in self._records():
            key = self._key(number, values)
            if not key:
                raise BatchUsageError(f"{self.path} row {number} has no value in the id column "
                                      f"{self.id_column!r}")
            yield key, f"row {number}"

    def rows(self) -> Iterator[BatchRow]:
        width = len(self.columns)
        for number, values in self._records():
            cells = (list(values) + [None] * width)[:width]
            row = BatchRow(self._key(number, values), row=number, values=cells)
            extra = [v for v in values[width:] if cell_text(v).strip()]
            if extra:
                row.error = refused(400, f"row {number} has {width + len(extra)} values but the "
                                    f"header names {width} columns")
                yield row
                continue
            body: dict[str, Any] = {"text": cell_text(cells[self._text_at])}
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
            if self.temperature is not None:
                body["temperature"] = self.temperature
            if self.model is not None:
                body["model"] = self.model
            try:
                row.request = SummarizeRequest.model_validate(body)
            except ValidationError as exc:
                row.error = invalid_request(exc)
            yield row


def unique_keys(keys: Iterator[tuple[str, str]], what: str) -> set[str]:
    """Every row's key; duplicates are refused up front (results could not be matched to rows,
    and resume could not tell them apart)."""
    seen: dict[str, str] = {}
    doubled: list[str] = []
    for key, where in keys:
        if key in seen:
            doubled.append(f"{key[:80]!r} ({seen[key]} and {where})")
        else:
            seen[key] = where
    if doubled:
        more = f" and {len(doubled) - 5} more" if len(doubled) > 5 else ""
        raise BatchUsageError(f"duplicate {what}: {'; '.join(doubled[:5])}{more}. Every row "
                              "needs its own, to match results to rows and to resume")
    return set(seen)


# ============================================================== results
def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def batch_output_line(result: RowResult) -> dict:
    """One line as vLLM's ``run-batch`` writes it (``BatchRequestOutput``): the response body
    on success; on failure ``response.body`` null and ``error`` our OpenAI error body."""
    return {
        "id": _new_id("batch"),
        "custom_id": result.row.key,
        "response": {"status_code": result.status, "request_id": _new_id("batch-req"),
                     "body": result.body if result.ok else None},
        "error": None if result.ok else result.body,
    }


@dataclass
class Resume:
    """What OUTPUT already holds."""

    keys: set[str] = field(default_factory=set)
    failed: int = 0
    dropped_partial: bool = False  # a last line cut short by a kill was removed


def _scan_lines(path: Path, parse: Callable[[bytes], tuple[str, bool]], resume: Resume) -> None:
    """Read ``path`` line by line with ``parse`` (key, ok). A last line that is cut short or
    unreadable is truncated away; an unreadable line before the end is a usage error (we did
    not write it, and will not guess)."""
    size = path.stat().st_size
    good_end = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            last = good_end + len(raw) >= size
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline")
                if raw.strip(b"\xef\xbb\xbf \t\r\n"):
                    key, ok = parse(raw)
                    resume.keys.add(key)
                    resume.failed += not ok
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if last:
                    resume.dropped_partial = True
                    break
                raise BatchUsageError(f"{path} line {number} is not a result line ({exc}); "
                                      "give another OUTPUT, or repair or delete this one") from None
            good_end += len(raw)
    if good_end < size:
        with open(path, "r+b") as f:
            f.truncate(good_end)


def _parse_result_line(raw: bytes) -> tuple[str, bool]:
    data = json.loads(raw)
    key = data["custom_id"]
    if not isinstance(key, str):
        raise ValueError("custom_id is not a string")
    return key, (data.get("response") or {}).get("status_code") == 200 and data.get("error") is None


class JsonlSink:
    """vLLM run-batch lines, appended and flushed as rows finish."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def resume(self) -> Resume:
        resume = Resume()
        if self.path.exists():
            _scan_lines(self.path, _parse_result_line, resume)
        return resume

    def open(self) -> None:
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, result: RowResult) -> None:
        self._file.write(json.dumps(batch_output_line(result), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self, complete: bool) -> None:
        if self._file is not None:
            self._file.close()


class CsvSink:
    """``row``, the input columns, ``summary``, ``error``; UTF-8 with a BOM so Excel shows Thai."""

    def __init__(self, path: Path, table: TableInput):
        self.path, self.table = path, table
        self.key_column = table.id_column or table.row_column
        self._file = None

    def resume(self) -> Resume:
        resume = Resume()
        if not self.path.exists() or self.path.stat().st_size == 0:
            return resume
        columns = self.table.output_columns
        size = self.path.stat().st_size
        consumed = 0
        records: list[tuple[int, list[str]]] = []  # (byte offset after the record, record)

        with open(self.path, "rb") as f:
            def lines() -> Iterator[str]:
                nonlocal consumed
                for raw in f:
                    consumed += len(raw)
                    yield raw.decode("utf-8", errors="replace")

            try:
                for record in csv.reader(lines(), strict=True):
                    records.append((consumed, record))
            except csv.Error as exc:
                if consumed < size:
                    raise BatchUsageError(f"{self.path} is not a CSV file this command wrote "
                                          f"({exc}); give another OUTPUT or delete it") from None
                resume.dropped_partial = True  # a quoted cell cut short at the end of the file
            f.seek(-1, os.SEEK_END)
            if records and not resume.dropped_partial and f.read(1) != b"\n":
                records.pop()  # the last record lost its line end: it may be cut short
                resume.dropped_partial = True
        good_end = records[-1][0] if records else 0
        if good_end < size:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        if not records:
            return resume
        first = records[0][1] or [""]
        header = [csv_text(c) for c in [first[0].removeprefix("\ufeff"), *first[1:]]]
        if header != columns:
            raise BatchUsageError(f"{self.path} exists with other columns than this run writes "
                                  f"({', '.join(columns)}); give another OUTPUT or delete it")
        key_at = columns.index(self.key_column)
        error_at = columns.index(self.table.error_column)
        for _, record in records[1:]:
            if len(record) == len(columns):
                resume.keys.add(csv_text(record[key_at]))
                resume.failed += bool(record[error_at])
        return resume

    def open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8-sig", newline="")
        if fresh:
            self._put(self.table.output_columns)

    def _put(self, record: list[Any]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer).writerow([csv_cell(value) for value in record])
        self._file.write(buffer.getvalue())  # one write per row: a kill cuts at most this one
        self._file.flush()

    def write(self, result: RowResult) -> None:
        row = result.row
        self._put([row.row, *row.values, result.summary(), result.error_text()])

    def close(self, complete: bool) -> None:
        if self._file is not None:
            self._file.close()


class XlsxSink:
    """Rows go to ``OUTPUT.progress.jsonl`` as they finish (append + flush); the workbook is
    written from it, in input order, at the end of the run and when it is interrupted."""

    def __init__(self, path: Path, table: TableInput):
        self.path, self.table = path, table
        self.sidecar = path.with_name(path.name + ".progress.jsonl")
        self._file = None

    def _record(self, row: int, key: str, values: list[Any], summary: str, error: str) -> str:
        return json.dumps({"row": row, "key": key, "values": values, "summary": summary,
                           "error": error}, ensure_ascii=False) + "\n"

    def resume(self) -> Resume:
        resume = Resume()
        if not self.sidecar.exists() and self.path.exists():
            self._seed_sidecar_from_workbook()
        if self.sidecar.exists():
            def parse(raw: bytes) -> tuple[str, bool]:
                data = json.loads(raw)
                if "columns" in data:
                    if data["columns"] != self.table.output_columns:
                        raise BatchUsageError(
                            f"{self.sidecar} is from a run with other columns; delete it and "
                            f"{self.path} to start over")
                    return "\0header", True
                return str(data["key"]), not data["error"]
            _scan_lines(self.sidecar, parse, resume)
            resume.keys.discard("\0header")
        return resume

    def _seed_sidecar_from_workbook(self) -> None:
        """A finished run deleted its sidecar: rebuild it from the workbook, so the rows in it
        are kept and not run again."""
        columns = self.table.output_columns
        records = iter(read_records(self.path))
        header = [cell_text(c) for c in next(records, [])][:len(columns)]
        if header != columns:
            raise BatchUsageError(f"{self.path} exists with other columns than this run writes "
                                  f"({', '.join(columns)}); give another OUTPUT or delete it")
        key_at = columns.index(self.table.id_column or self.table.row_column)
        with open(self.sidecar, "w", encoding="utf-8") as f:
            f.write(json.dumps({"columns": columns}, ensure_ascii=False) + "\n")
            for values in records:
                values = (list(values) + [None] * len(columns))[:len(columns)]
                if values[0] is None:
                    continue
                f.write(self._record(int(values[0]), cell_text(values[key_at]), values[1:-2],
                                     cell_text(values[-2]), cell_text(values[-1])))

    def open(self) -> None:
        fresh = not self.sidecar.exists() or self.sidecar.stat().st_size == 0
        self._file = open(self.sidecar, "a", encoding="utf-8")
        if fresh:
            self._file.write(json.dumps({"columns": self.table.output_columns},
                                        ensure_ascii=False) + "\n")
            self._file.flush()

    def write(self, result: RowResult) -> None:
        row = result.row
        self._file.write(self._record(row.row, row.key, row.values, result.summary(),
                                      result.error_text()))
        self._file.flush()

    def close(self, complete: bool) -> None:
        if self._file is not None:
            self._file.close()
        if self.sidecar.exists():
            write_workbook(self.path, self.table.output_columns, self.sidecar)
            if complete:
                self.sidecar.unlink()


def _xlsx_cell(value: Any) -> Any:
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    if value == "":
        return None  # an empty cell, not a cell holding ""
    if isinstance(value, str):
        value = ILLEGAL_CHARACTERS_RE.sub("", value)  # control characters openpyxl refuses
        if len(value) > XLSX_CELL_LIMIT:
            marker = f"…[{len(value) - XLSX_CELL_LIMIT + 40} more characters]"
            value = value[:XLSX_CELL_LIMIT - len(marker)] + marker
    return value


def write_workbook(path: Path, columns: list[str], sidecar: Path) -> None:
    """The workbook from the sidecar, rows in input order, written beside and renamed over
    ``path`` so a reader never sees half a file."""
    import openpyxl

    records = []
    with open(sidecar, encoding="utf-8") as f:
        for line in f:
            try:
                data = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill; resume redoes its row
            if "columns" not in data:
                records.append(data)
    records.sort(key=lambda r: r["row"])
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("results")
    sheet.append(string_cells(sheet, [_xlsx_cell(c) for c in columns]))
    for r in records:
        sheet.append(string_cells(sheet, [_xlsx_cell(v) for v in
                                           [r["row"], *r["values"], r["summary"], r["error"]]]))
    partial = path.with_name(f".{path.name}.partial")
    book.save(partial)
    os.replace(partial, path)
