"""``docs/configuration.md``, written from the settings' own fields.

The table is generated so that it cannot drift from the code: every setting's
environment variable, flag, default, bounds and description come from
:mod:`api.settings`. ``python -m api.settings_doc`` rewrites the file (``make docs``);
a test fails when the committed file differs from what this module writes.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from api.settings import ModelSettings, ServerSettings

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEADER = """\
# Configuration

Every setting is an environment variable `THAI_<NAME>` (or a line in `.env`) and a flag of
`python app.py` (`python app.py --help` prints the same descriptions). A bad value stops the
server at start with one line naming the setting.

This file is generated from `api/settings.py` by `make docs` (`python -m api.settings_doc`);
a test fails when it differs from the code, so edit the field's description, not this file.
"""

GROUPS = (
    ("Model and generation", ModelSettings),
    ("Server, access and limits", ServerSettings),
)

# annotated_types constraint -> (its attribute, how the table writes it)
_BOUNDS = {annotated_types.Ge: ("ge", ">="), annotated_types.Gt: ("gt", ">"),
           annotated_types.Le: ("le", "<="), annotated_types.Lt: ("lt", "<"),
           annotated_types.MinLen: ("min_length", "length >="),
           annotated_types.MaxLen: ("max_length", "length <=")}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list):
        return "`" + ",".join(map(str, value)) + "`" if value else "empty"
    if isinstance(value, str):
        if not value:
            return "empty"
        if len(value) > 40:  # the summary prompt: the description says what it is
            return "(see description)"
    return f"`{value}`" if not isinstance(value, bool) else f"`{str(value).lower()}`"


def _bounds(field: FieldInfo) -> str:
    parts = []
    for constraint in field.metadata:
        if type(constraint) in _BOUNDS:
            attribute, sign = _BOUNDS[type(constraint)]
            parts.append(f"{sign} {getattr(constraint, attribute)}")
    if typing.get_origin(field.annotation) is typing.Literal:
        parts.append(" / ".join(f"`{c}`" for c in typing.get_args(field.annotation)))
    return ", ".join(parts)


def _rows(model: type[BaseModel]) -> list[str]:
    rows = ["| variable | flag | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        rows.append(f"| `THAI_{name.upper()}` | `--{name.replace('_', '-')}` | "
                    f"{_cell(_default(field))} | {_cell(_bounds(field))} | "
                    f"{_cell(field.description or '')} |")
    return rows


def render() -> str:
    lines = [HEADER]
    for title, model in GROUPS:
        lines += [f"## {title}", "", *_rows(model), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md from api/settings.py.")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 (writing nothing) when the file differs from the settings")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
