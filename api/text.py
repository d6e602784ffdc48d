"""Text hygiene shared by the API and the UI, so counts and prompts agree."""

from __future__ import annotations

import re
import unicodedata

# Zero-width and BOM characters that render as nothing.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalize_text(text: str) -> str:
    """Unicode NFC (Thai vowel and tone marks have one canonical order) and no control chars."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))


def is_blank(text: str) -> bool:
    """True when nothing visible remains (whitespace, zero-width and control characters only)."""
    return not normalize_text(text).translate({ord(c): None for c in _INVISIBLE}).strip()
