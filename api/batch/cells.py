"""Result cells that stay text in a spreadsheet (CSV injection).

Batch results are opened in Excel, LibreOffice or Google Sheets, and their cells come from
anyone: the input's rows (an anonymous upload in the UI) and the model's summaries. A text
cell must never run as a formula (``=HYPERLINK(...)``, ``=cmd|...``, ``@SUM(...)``):

- ``.csv``: OWASP's advice (Cheat Sheet "CSV Injection"): a text starting with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return gets a leading ``'`` (:func:`csv_cell`); a plain
  number such as ``-5`` is left as it is, it cannot be a formula;
- ``.xlsx``: every text is written as a string cell (:func:`string_cells`); openpyxl would
  otherwise store a text starting with ``=`` as a formula and ``#N/A`` as an error value.
"""

from __future__ import annotations

import re
from typing import Any

# Characters a spreadsheet reads as the start of a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """A cell as a CSV result holds it: a text a spreadsheet would run as a formula gets a
    leading ``'``. A text that already starts with ``'`` gets one more, so :func:`csv_text`
    gives back exactly what was written (resume matches keys on it)."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith("'") or (value.startswith(FORMULA_STARTS)
                                 and not _PLAIN_NUMBER.fullmatch(value)):
        return "'" + value
    return value


def csv_text(cell: str) -> str:
    """The text :func:`csv_cell` escaped."""
    return cell[1:] if cell.startswith("'") else cell


def string_cells(sheet: Any, values: list[Any]) -> list[Any]:
    """A row for a write-only openpyxl ``sheet``: texts as string cells, the rest as is."""
    from openpyxl.cell import WriteOnlyCell

    cells: list[Any] = []
    for value in values:
        if isinstance(value, str):
            cell = WriteOnlyCell(sheet, value=value)
            cell.data_type = "s"  # inline string: never a formula or an error value
            value = cell
        cells.append(value)
    return cells
