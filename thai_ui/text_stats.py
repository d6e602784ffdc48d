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
from thai_ui.worker_process import SpawnedWorker

WORD_ENGINE = "newmm"
# Texts up to this many code points are counted in-process (a few milliseconds);
# longer ones in the counting process (see TextCounter).
IN_PROCESS_CHARS = 4000



def count_graphemes(text: str) -> int:
    """User-perceived characters (extended grapheme clusters) after NFC: the one meaning of
    "ตัวอักษร / characters" in the UI (the counter, a document's line)."""
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
    # Set (to the text's length in code points) when the text is longer than any request
    # accepts: then nothing is counted, so a pasted 2 MB text costs no segmentation.
    too_long: int | None = None
    max_chars: int | None = None
    # Longer than one summarization call reads (THAI_SUMMARY_CHUNK_TOKENS, or past the
    # context): the serving layer summarizes it in chunks, so it is not "too long".
    chunked: bool = False

    @property
    def over_limit(self) -> bool:
        return self.tokens is not None and self.token_limit is not None and self.tokens > self.token_limit

    def markdown(self) -> str:
        """One line, Thai then English, with thousands separators."""
        if self.too_long is not None:
            return (f"⚠ ข้อความยาวเกินไป / text too long: **{self.too_long:,}** ตัวอักษร / characters "
                    f"(สูงสุด / at most {self.max_chars or 0:,})")
        parts = [f"ตัวอักษร / characters: **{self.graphemes:,}**",
                 f"คำ / words: **{self.words:,}**"]
        if self.tokens is None:
            parts.append("โทเค็น / tokens: — (รอโมเดล / model loading)")
        else:
            limit = f" / {self.token_limit:,}" if self.token_limit is not None else ""
            warn = " ⚠ ยาวเกินไป / too long" if self.over_limit and not self.chunked else ""
            parts.append(f"โทเค็น / tokens: **{self.tokens:,}**{limit}{warn}")
            if self.chunked:
                parts.append("ยาว จะสรุปทีละส่วน / long: summarized in chunks")
        return " · ".join(parts)


def count_text(text: str) -> tuple[int, int]:
    """(graphemes, words): what the counting process computes."""
    return count_graphemes(text), count_words(text)


class TextCounter:
    """Counts long texts in a separate process, one at a time (:class:`SpawnedWorker`).

    Measured here: a 200-token chat went from 0.25 s to 3 s beside six counts of
    200,000 characters run in threads; in the counting process it is unaffected.
    """

    def __init__(self) -> None:
        self._worker = SpawnedWorker("text-counting")

    def count(self, text: str, timeout: float = 60.0) -> tuple[int, int]:
        if len(text) <= IN_PROCESS_CHARS:
            return count_text(text)
        return self._worker.call(count_text, text, timeout=timeout)

    def close(self) -> None:
        self._worker.close()
