"""Counts that are right for Thai text.

Thai writes words without spaces and stacks vowel and tone marks on
consonants, so ``len(text)`` and ``text.split()`` both mislead: a reader's
"character" is a grapheme cluster (``กี่`` is one, three code points) and
words need a dictionary tokenizer (PyThaiNLP's ``newmm``). The model's own
token count comes from the engine's tokenizer, the number that the context
limit is about.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import grapheme

from api.text import normalize_text

WORD_ENGINE = "newmm"


def count_graphemes(text: str) -> int:
    """User-perceived characters (extended grapheme clusters) after NFC."""
    return grapheme.length(normalize_text(text))


def _is_word(token: str) -> bool:
    """A token counts as a word when it holds a letter or a digit (not space or punctuation)."""
    return any(unicodedata.category(ch)[0] in "LN" for ch in token)


def count_words(text: str) -> int:
    """Words as PyThaiNLP segments them; mixed Thai/English text works too."""
    from pythainlp.tokenize import word_tokenize  # loads its dictionary on first use

    text = normalize_text(text)
    if not text.strip():
        return 0
    return sum(1 for token in word_tokenize(text, engine=WORD_ENGINE, keep_whitespace=False)
               if _is_word(token))


@dataclass(frozen=True)
class TextStats:
    """What the summarize tab shows under the text box."""

    graphemes: int
    words: int
    tokens: int | None  # prompt tokens (template included); None while the model loads
    token_limit: int | None  # prompt tokens that fit next to the requested summary length

    @property
    def over_limit(self) -> bool:
        return self.tokens is not None and self.token_limit is not None and self.tokens > self.token_limit

    def markdown(self) -> str:
        """One line, Thai then English, with thousands separators."""
        parts = [f"ตัวอักษร / characters: **{self.graphemes:,}**",
                 f"คำ / words: **{self.words:,}**"]
        if self.tokens is None:
            parts.append("โทเค็น / tokens: — (รอโมเดล / model loading)")
        else:
            limit = f" / {self.token_limit:,}" if self.token_limit is not None else ""
            warn = " ⚠ ยาวเกินไป / too long" if self.over_limit else ""
            parts.append(f"โทเค็น / tokens: **{self.tokens:,}**{limit}{warn}")
        return " · ".join(parts)
