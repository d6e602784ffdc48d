"""Files the UI reads: documents for the summarize tab, CSV/XLSX tables for the batch tab.

Parsing is CPU-bound pure Python (pypdf, the .docx reader, openpyxl, the CSV reader), and
the UI is public: a hostile file in the serving process would cost it gigabytes and hold the
interpreter lock that the event loop and the engine's worker need. So every parse runs in
the app's sandboxed worker processes (:class:`api.documents.pool.ParsePool`, shared with
the API: memory and CPU limits, killed and replaced when a file overruns them, a bound on
jobs per visitor); the serving process only awaits it (:class:`FileWorker`).

Every file is read with a size cap before it is parsed (:func:`read_capped`), and only
from the UI's upload folder: :mod:`thai_ui.guard` refuses any other path before Gradio
sees the event, and the handlers check again (:meth:`UploadStore.resolve`).

The job functions here run in the worker: they take paths and limits, and return plain
values or raise :class:`FileJobError`, which crosses the process boundary intact and
carries the code the UI's messages know (:mod:`thai_ui.messages`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from api.batch.formats import BatchUsageError, CsvSink, TableInput, XlsxSink
from api.documents.errors import DocumentError, ParseBusyError, ParseQueueFullError
from api.documents.pool import ParsePool

log = logging.getLogger("thai.ui.documents")

DOCUMENT_TYPES = (".txt", ".md", ".html", ".htm", ".docx", ".pdf")
TABLE_TYPES = (".csv", ".xlsx")
# An .xlsx is a zip of XML: what its directory declares is checked before openpyxl reads a
# byte of it, so a small upload cannot expand into gigabytes of rows (a "zip bomb").
XLSX_MAX_UNCOMPRESSED = 64 * 1024 * 1024
XLSX_MAX_ENTRIES = 5000


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


def extract_job(path: str, filename: str, max_bytes: int, max_pages: int,
                time_budget_s: float = 120.0) -> DocumentText:
    """In the worker: the document's text (``api.documents.extract``)."""
    from api.documents.extract import extract_document

    data = read_capped(path, max_bytes)
    if not data:
        raise FileJobError("document_empty", "The file is empty (0 bytes).")
    try:
        document = extract_document(data, filename, max_bytes=max_bytes, max_pages=max_pages,
                                    time_budget_s=time_budget_s)
    except DocumentError as exc:
        raise FileJobError(exc.code or "invalid_document", exc.message,
                           getattr(exc, "status_code", 400)) from None
    from thai_ui.text_stats import count_graphemes

    # Characters as the counter under the text box counts them (grapheme clusters: กี่ is
    # one), so the file line and the counter show one number for one text.
    return DocumentText(document.text, document.filename, document.kind, document.pages,
                        count_graphemes(document.text))


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
                max_tokens: int | None = None, temperature: float | None = None,
                model: str | None = None):
    fmt = table_format(filename)
    _check_table_file(path, fmt, max_bytes)
    try:
        return UITable(Path(path), text_column, None, max_tokens, temperature, model), fmt
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
                   max_tokens: int | None, temperature: float | None,
                   model: str | None = None) -> tuple[Any, list, str]:
    """In the worker: (the table, its rows as batch requests, csv|xlsx), at most ``max_rows``."""
    table, fmt = _open_table(path, filename, text_column, max_bytes, max_tokens=max_tokens,
                             temperature=temperature, model=model)
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
    """The file jobs above in the app's :class:`~api.documents.pool.ParsePool`, as one of
    the visitor's parse jobs; a reader that dies or overruns is the file's fault, told as
    such, and a visitor with a file already being read is told to wait."""

    def __init__(self, pool: ParsePool) -> None:
        self.pool = pool

    async def run(self, job, *args, client: str = "-"):
        """``job(*args)`` in a worker process; its :class:`FileJobError` raises here, and so
        does the pool's refusal (limits, too many jobs) as one."""
        try:
            return await self.pool.run(client, job, *args)
        except (ParseBusyError, ParseQueueFullError) as exc:  # the UI says: busy, try again
            raise FileJobError("server_overloaded", exc.message, exc.status_code) from None
        except DocumentError as exc:
            raise FileJobError(exc.code or "invalid_document", exc.message,
                               getattr(exc, "status_code", 400)) from None

    def close(self) -> None:
        """Nothing to stop: the pool is the app's (closed at its shutdown)."""
