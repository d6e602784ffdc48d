"""Files the UI reads: documents for the summarize tab, CSV/XLSX tables for the batch tab.

Parsing is CPU-bound pure Python (pypdf, the .docx reader, openpyxl, the CSV reader): in a
thread of the serving process it would hold the interpreter lock that the event loop and
the engine's worker need, and the UI is public. So, like the live counters
(:class:`thai_ui.text_stats.TextCounter`), every parse runs in one separate worker process,
one at a time for all visitors (:class:`FileWorker`); the serving process only awaits it.

Every file is read with a size cap before it is parsed (:func:`read_capped`), and only
from the UI's upload folder: :mod:`thai_ui.guard` refuses any other path before Gradio
sees the event, and the handlers check again (:meth:`UploadStore.resolve`).

The job functions here run in the worker: they take paths and limits, and return plain
values or raise :class:`FileJobError`, which crosses the process boundary intact (the
``DocumentError`` classes of :mod:`api.documents` do not all pickle).
"""

from __future__ import annotations

import asyncio
import logging
import os
import zipfile
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from api.batch.formats import BatchUsageError, CsvSink, TableInput, XlsxSink
from thai_ui.worker_process import SpawnedWorker

log = logging.getLogger("thai.ui.documents")

DOCUMENT_TYPES = (".txt", ".md", ".html", ".htm", ".docx", ".pdf")
TABLE_TYPES = (".csv", ".xlsx")
# An .xlsx is a zip of XML: what its directory declares is checked before openpyxl reads a
# byte of it, so a small upload cannot expand into gigabytes of rows (a "zip bomb").
XLSX_MAX_UNCOMPRESSED = 64 * 1024 * 1024
XLSX_MAX_ENTRIES = 5000
JOB_TIMEOUT_S = 180.0  # longer than api.documents' own PDF time budget (120 s)


class FileJobError(Exception):
    """Why a file could not be read: an error code (see :mod:`thai_ui.messages`), the
    status the API would answer, and the reader's English explanation."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(code, message, status)
        self.code, self.message, self.status = code, message, status

    def __reduce__(self):
        return (FileJobError, (self.code, self.message, self.status))


@dataclass(frozen=True)
class DocumentText:
    """What the summarize tab shows of an uploaded document."""

    text: str
    filename: str
    kind: str
    pages: int | None
    characters: int


@dataclass(frozen=True)
class TableInfo:
    """What the batch tab shows of an uploaded table."""

    columns: list[str]
    default_column: str | None  # as the command line picks: 'text', else the only column
    rows: int  # rows with any value, counted up to the limit plus one
    format: str  # csv or xlsx


# ============================================================== reading
def read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The file's bytes, or a ``document_too_large`` error without reading past the cap."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            size = os.fstat(f.fileno()).st_size
            raise FileJobError("document_too_large",
                               f"The file is {size:,} bytes, over this server's limit of "
                               f"{max_bytes:,} bytes ({max_bytes / 1048576:.1f} MiB).", 413)
    return data


def extract_job(path: str, filename: str, max_bytes: int, max_pages: int) -> DocumentText:
    """In the worker: the document's text (``api.documents.extract``)."""
    from api.documents.errors import DocumentError
    from api.documents.extract import extract_document

    data = read_capped(path, max_bytes)
    if not data:
        raise FileJobError("document_empty", "The file is empty (0 bytes).")
    try:
        document = extract_document(data, filename, max_bytes=max_bytes, max_pages=max_pages)
    except DocumentError as exc:
        raise FileJobError(exc.code or "invalid_document", exc.message,
                           getattr(exc, "status_code", 400)) from None
    return DocumentText(document.text, document.filename, document.kind, document.pages,
                        document.characters)


def table_format(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in TABLE_TYPES:
        raise FileJobError("unsupported_table_type",
                           f"{Path(filename).name!r} is not a table file: upload a .csv "
                           "(UTF-8) or an .xlsx workbook.")
    return suffix.lstrip(".")


def _check_table_file(path: str, fmt: str, max_bytes: int) -> None:
    data_size = os.path.getsize(path)
    if data_size > max_bytes:
        read_capped(path, max_bytes)  # raises document_too_large
    if fmt != "xlsx":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise FileJobError("malformed_table", "The file is not a readable .xlsx workbook.") from None
    declared = sum(entry.file_size for entry in entries)
    if len(entries) > XLSX_MAX_ENTRIES or declared > XLSX_MAX_UNCOMPRESSED:
        raise FileJobError("document_too_complex",
                           f"The workbook unpacks to {declared:,} bytes in {len(entries):,} parts, "
                           f"over this server's limit of {XLSX_MAX_UNCOMPRESSED:,} bytes "
                           f"and {XLSX_MAX_ENTRIES:,} parts.")


def _open_table(path: str, filename: str, text_column: str | None, max_bytes: int, *,
                max_tokens: int | None = None, temperature: float | None = None):
    fmt = table_format(filename)
    _check_table_file(path, fmt, max_bytes)
    try:
        return UITable(Path(path), text_column, None, max_tokens, temperature), fmt
    except BatchUsageError as exc:
        raise _table_error(exc) from None
    except Exception as exc:  # openpyxl on a damaged sheet, and the like
        log.info("table could not be read: %r", exc)
        raise FileJobError("malformed_table", "The file could not be read as a table.") from None


def _table_error(exc: Exception) -> FileJobError:
    message = str(exc).replace(" (--text-column)", "")
    if "no column" in message:
        return FileJobError("table_column_missing", message)
    if "not UTF-8" in message:
        return FileJobError("table_not_utf8", message)
    return FileJobError("malformed_table", message)


def table_info_job(path: str, filename: str, max_bytes: int, max_rows: int) -> TableInfo:
    """In the worker: the table's columns, the default text column and its row count."""
    table, fmt = _open_table(path, filename, None, max_bytes)
    try:
        rows = sum(1 for _ in islice(table.keys(), max_rows + 1))
    except BatchUsageError as exc:
        raise _table_error(exc) from None
    return TableInfo(list(table.columns), table.default_column, rows, fmt)


def read_table_job(path: str, filename: str, text_column: str, max_bytes: int, max_rows: int,
                   max_tokens: int | None, temperature: float | None) -> tuple[Any, list, str]:
    """In the worker: (the table, its rows as batch requests, csv|xlsx), at most ``max_rows``."""
    table, fmt = _open_table(path, filename, text_column, max_bytes, max_tokens=max_tokens,
                             temperature=temperature)
    try:
        rows = list(islice(table.rows(), max_rows + 1))
    except BatchUsageError as exc:
        raise _table_error(exc) from None
    if len(rows) > max_rows:
        raise FileJobError("too_many_rows", f"The file has more than {max_rows:,} rows; "
                           f"this page runs at most {max_rows:,} (split the file, or use "
                           "./manage.sh batch on the server).")
    if not rows:
        raise FileJobError("empty_table", "The file has a header row but no rows of text.")
    return table, rows, fmt


def write_results_job(table: Any, results: list, fmt: str, path: str) -> int:
    """In the worker: the result file (the input's columns, ``summary``, ``error``), rows in
    the input's order; returns its size."""
    sink = CsvSink(Path(path), table) if fmt == "csv" else XlsxSink(Path(path), table)
    sink.open()
    try:
        for result in sorted(results, key=lambda r: r.row.row or 0):
            sink.write(result)
    finally:
        sink.close(complete=True)
    return os.path.getsize(path)


class UITable(TableInput):
    """The command line's table reader; with no text column named, it remembers the one the
    command line would pick (or None when it could not pick) instead of failing."""

    default_column: str | None = None

    def _pick_text_column(self, wanted: str | None) -> str:
        if wanted:
            return super()._pick_text_column(wanted)
        try:
            self.default_column = super()._pick_text_column(None)
        except BatchUsageError:
            self.default_column = None
            return self.columns[0]
        return self.default_column


# ============================================================== the worker
class FileWorker:
    """The file jobs above in one :class:`SpawnedWorker` process, one at a time, with a time
    limit; a reader that dies or overruns is the file's fault, told as such."""

    def __init__(self, timeout_s: float = JOB_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._worker = SpawnedWorker("file-reading")

    async def run(self, job, *args):
        """``job(*args)`` in the worker process; its :class:`FileJobError` raises here."""
        try:
            return await self._worker.acall(job, *args, timeout=self.timeout_s)
        except BrokenProcessPool:
            raise FileJobError("document_too_complex", "Reading the file stopped the reader.") from None
        except asyncio.TimeoutError:
            raise FileJobError("document_too_complex", f"Reading the file took over "
                               f"{self.timeout_s:.0f} s.") from None

    def close(self) -> None:
        self._worker.close()
