"""The documentation stays true to the code: the settings table is generated, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from api import settings_doc
from api.settings import ModelSettings, ServerSettings

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_configuration_doc_is_generated_from_the_settings():
    assert settings_doc.DOC_PATH.read_text(encoding="utf-8") == settings_doc.render(), \
        "docs/configuration.md is out of date: run `make docs`"


def test_every_setting_has_a_row_with_its_description():
    text = settings_doc.render()
    for model in (ModelSettings, ServerSettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{name} has no description"
            assert f"| `THAI_{name.upper()}` | `--{name.replace('_', '-')}` |" in text


def test_bounds_are_shown():
    text = settings_doc.render()
    row = next(line for line in text.splitlines() if line.startswith("| `THAI_PORT` |"))
    assert ">= 1" in row and "<= 65535" in row
    row = next(line for line in text.splitlines() if line.startswith("| `THAI_DEVICE` |"))
    assert "`auto` / `cpu` / `cuda`" in row


def test_readme_is_short_and_every_relative_link_resolves():
    readme = REPO / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) < 200
    for doc in [readme, *sorted((REPO / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
