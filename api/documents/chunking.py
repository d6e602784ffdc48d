"""Split a long Thai text into pieces that each fit a token budget.

:func:`split_text` cuts on the strongest boundary it can: paragraph breaks (blank lines),
then line breaks, then Thai sentence boundaries (PyThaiNLP's ``crfcut`` sentence segmenter,
a CRF model bundled with PyThaiNLP that needs ``python-crfsuite``), then spaces, then word
boundaries (PyThaiNLP's ``newmm`` dictionary segmenter), and only for one "word" longer than
the whole budget (a URL, a base64 blob) between grapheme clusters. Nothing is lost: the
pieces, joined, are the text again except for whitespace at the cuts.

It is linear in the text: a part is segmented only when it does not fit whole, each part is
counted once, a piece is counted once more when it is complete (token counts of parts do
not add up exactly), and a cut moves at most half a piece's parts into the next one.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterator
from functools import lru_cache

log = logging.getLogger("thai.documents")

# Boundary strength after a part: lower is stronger.
PARAGRAPH, LINE, SENTENCE, SPACE, WORD, GRAPHEME = range(6)
_END = -1  # the end of the text

_PARAGRAPHS = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINES = re.compile(r"\n\s*")
_SPACES = re.compile(r"\s+")
_JOINERS = frozenset("\u200d\u034f")  # zero-width joiner, combining grapheme joiner
# a cut is moved back to a stronger boundary if that keeps at least this share of the piece
_BACKTRACK_SHARE = 0.5


def _split_after(pattern: re.Pattern, text: str) -> list[str]:
    """Parts of ``text`` that each end with a match of ``pattern`` (the last may not)."""
    parts, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start and match.start() > start:
            parts.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


@lru_cache(maxsize=1)
def _crfcut_available() -> bool:
    try:
        import pycrfsuite  # noqa: F401  (python-crfsuite, which PyThaiNLP's crfcut needs)
    except ImportError:
        log.warning("python-crfsuite is not installed: long Thai texts are split at spaces "
                    "instead of sentence boundaries")
        return False
    return True


def _sentences(text: str) -> list[str]:
    if _crfcut_available():
        from pythainlp.tokenize import sent_tokenize

        try:
            parts = sent_tokenize(text, engine="crfcut")
        except Exception as exc:  # the model file missing or damaged: spaces will do
            log.warning("Thai sentence segmentation failed (%r); splitting at spaces", exc)
        else:
            if "".join(parts) == text:
                return [p for p in parts if p]
    return _split_after(_SPACES, text)


def _words(text: str) -> list[str]:
    """Words (newmm), never starting inside a grapheme cluster: newmm keeps Thai clusters
    whole, but cuts other scripts' combining marks (e + U+0301) from their letter."""
    from pythainlp.tokenize import word_tokenize

    parts = word_tokenize(text, engine="newmm")
    if "".join(parts) != text:
        return [text]
    words: list[str] = []
    for part in parts:
        if words and part and (unicodedata.category(part[0])[0] == "M" or part[0] in _JOINERS
                               or words[-1][-1:] in _JOINERS):
            words[-1] += part
        elif part:
            words.append(part)
    return words


def _split(text: str, level: int) -> list[str]:
    if level == PARAGRAPH:
        return _split_after(_PARAGRAPHS, text)
    if level == LINE:
        return _split_after(_LINES, text)
    if level == SENTENCE:
        return _sentences(text)
    if level == SPACE:
        return _split_after(_SPACES, text)
    return _words(text)


def _graphemes(text: str, max_tokens: int, count: Callable[[str], int]) -> Iterator[tuple[str, int]]:
    """Runs of whole grapheme clusters of ``text``, each as long as fits ``max_tokens``
    (found by doubling then bisecting, so each cluster is counted O(log n) times)."""
    import grapheme

    clusters = list(grapheme.graphemes(text))
    start = 0
    while start < len(clusters):
        end, tokens = start + 1, count(clusters[start])  # one cluster always goes
        step, over = 1, None
        while end < len(clusters):
            probe = min(len(clusters), end + step)
            probe_tokens = count("".join(clusters[start:probe]))
            if probe_tokens > max_tokens:
                over = probe
                break
            end, tokens, step = probe, probe_tokens, step * 2
        if over is not None:  # end fits, over does not: bisect between them
            while over - end > 1:
                middle = (end + over) // 2
                middle_tokens = count("".join(clusters[start:middle]))
                if middle_tokens <= max_tokens:
                    end, tokens = middle, middle_tokens
                else:
                    over = middle
        yield "".join(clusters[start:end]), tokens
        start = end


def _parts(text: str, level: int, after: int, max_tokens: int,
           count: Callable[[str], int]) -> Iterator[tuple[str, int, int]]:
    """(part, tokens, boundary after it) for the parts of ``text`` that each fit, in order."""
    pieces = _split(text, level)
    if len(pieces) <= 1 and level < WORD:
        yield from _parts(text, level + 1, after, max_tokens, count)
        return
    last = len(pieces) - 1
    for index, piece in enumerate(pieces):
        boundary = after if index == last else level
        tokens = count(piece)
        if tokens <= max_tokens:
            yield piece, tokens, boundary
        elif level < WORD:
            yield from _parts(piece, level + 1, boundary, max_tokens, count)
        else:  # one word over the budget: cut between grapheme clusters
            runs = list(_graphemes(piece, max_tokens, count))
            for run_index, (run, run_tokens) in enumerate(runs):
                yield run, run_tokens, boundary if run_index == len(runs) - 1 else GRAPHEME


def split_text(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    """``text`` cut into pieces of at most ``max_tokens`` tokens each, as ``count_tokens``
    counts them, at the strongest boundaries (see the module documentation).

    Pieces are stripped of the whitespace at the cuts; a blank text gives no pieces. A single
    grapheme cluster that alone is over the budget (only with a tiny budget) is still a piece.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not text or not text.strip():
        return []
    if count_tokens(text) <= max_tokens:
        return [text.strip()]

    chunks: list[str] = []
    current: list[tuple[str, int, int]] = []
    total = 0

    def flush(keep: int) -> None:
        """Emit current[:keep] as a piece (fewer if the piece, counted whole, is over the
        budget); the rest stays in ``current`` for the next piece."""
        nonlocal current, total
        while True:
            piece = "".join(part for part, _, _ in current[:keep]).strip()
            if keep <= 1 or count_tokens(piece) <= max_tokens:
                break
            keep -= 1
        if piece:
            chunks.append(piece)
        current = current[keep:]
        total = sum(tokens for _, tokens, _ in current)

    for part in _parts(text, PARAGRAPH, _END, max_tokens, count_tokens):
        if current and total + part[1] > max_tokens:
            # cut at the strongest boundary in the last half of the piece, latest among equals
            best, best_strength, running = len(current), current[-1][2], total
            for index in range(len(current) - 1, 0, -1):
                running -= current[index][1]
                if running < _BACKTRACK_SHARE * max_tokens:
                    break
                strength = current[index - 1][2]
                if strength < best_strength:
                    best, best_strength = index, strength
            flush(best)
            while current and total + part[1] > max_tokens:
                flush(len(current))
        current.append(part)
        total += part[1]
    while current:
        flush(len(current))
    return chunks
