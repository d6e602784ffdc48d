"""Repair Thai text the way PDF text extractors return it.

A PDF stores glyphs, not characters; the text layer is rebuilt from each font's
``/ToUnicode`` map, and Thai suffers from it in known ways:

* **Positional glyph variants.** Thai marks are drawn in different places depending on
  their neighbours (a tone mark lowered when there is no vowel above, shifted left after
  the tall consonants ป ฝ ฟ, ...). Legacy fonts reach those glyphs through private-use code
  points (U+F700–U+F71A on Windows, U+F884–U+F89E on the Mac) that extractors return as
  they are. Fonts that reach them through OpenType substitutions often have no ``/ToUnicode``
  entry for them, or map them to U+0000 (Chromium/Skia does): the extracted text has a NUL,
  U+FFFD or pdfminer's ``(cid:N)`` where a mark was. Here the private-use code points map
  back through HarfBuzz's table, and unknown glyphs are guessed with the Thai dictionary:
  every mark (or mark pair) that makes a valid Thai cluster is tried, and the one whose
  words are most frequent wins. Glyphs that carry an identity (``(cid:N)``, or the
  placeholders :mod:`api.documents.pdf_text` puts in place of unmapped glyphs, see
  :func:`glyph_placeholder`) are decided once per glyph, by all their occurrences.
* **Shaping order.** Shapers draw SARA AM (ำ) as NIKHAHIT + SARA AA (ํ + า) with the
  NIKHAHIT moved before a tone mark; extractors return that order. It is recomposed, and
  marks are put in the canonical order (vowel above or below, then tone mark).
* **Layout.** Extractors put spaces and line breaks where glyphs are apart on the page:
  before combining marks, inside words, at the end of every printed line. Lines that the
  layout broke are joined (Thai does not put spaces between words, so a wrapped Thai line
  joins with nothing), spaces that split one dictionary word are removed, and headers,
  footers and page numbers repeated on most pages are dropped (this needs the pages:
  :func:`clean_thai_pdf_pages`; :func:`clean_thai_pdf_text` splits on form feeds).

No HTTP here: plain text in, plain text out.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import lru_cache

# ----------------------------------------------------------------------------- characters

CONSONANTS = "".join(chr(c) for c in range(0x0E01, 0x0E2F))  # ก .. ฮ
ABOVE_VOWELS = "\u0E31\u0E34\u0E35\u0E36\u0E37\u0E47"  # ั ิ ี ึ ื ็
BELOW_VOWELS = "\u0E38\u0E39\u0E3A"  # ุ ู ฺ
TONE_MARKS = "\u0E48\u0E49\u0E4A\u0E4B"  # ่ ้ ๊ ๋
THANTHAKHAT, NIKHAHIT, YAMAKKAN = "\u0E4C", "\u0E4D", "\u0E4E"  # ์ ํ ๎
MARKS = ABOVE_VOWELS + BELOW_VOWELS + TONE_MARKS + THANTHAKHAT + NIKHAHIT + YAMAKKAN
LEADING_VOWELS = "\u0E40\u0E41\u0E42\u0E43\u0E44"  # เ แ โ ใ ไ
NON_INITIAL = "\u0E30\u0E32\u0E33\u0E45"  # ะ า ำ ๅ: never start a syllable
SARA_AA, SARA_AM = "\u0E32", "\u0E33"

_CONSONANT_SET = frozenset(CONSONANTS)
_MARK_SET = frozenset(MARKS)
_VOWEL_MARKS = frozenset(ABOVE_VOWELS + BELOW_VOWELS + NIKHAHIT)
_TOP_MARKS = frozenset(TONE_MARKS + THANTHAKHAT + YAMAKKAN)


def is_thai(char: str) -> bool:
    return "\u0E01" <= char <= "\u0E5B"


# Thai glyph variants in the private-use area -> the character they draw. The table is
# HarfBuzz's fallback shaper for fonts without Thai OpenType tables (thai_pua_shape() in
# src/hb-ot-shaper-thai.cc, https://github.com/harfbuzz/harfbuzz): SD = shifted down,
# SDL = down-left, SL = left, RD = descender removed; first the Windows code point, then
# the Mac one. Fonts of the Thai font vendors (TH Sarabun PSK, Angsana New, ...) carry the
# Windows set, so PDFs made with them often return these code points.
_PUA_TABLE = {
    # SD
    0x0E48: (0xF70A, 0xF88B), 0x0E49: (0xF70B, 0xF88E), 0x0E4A: (0xF70C, 0xF891),
    0x0E4B: (0xF70D, 0xF894), 0x0E4C: (0xF70E, 0xF897), 0x0E38: (0xF718, 0xF89B),
    0x0E39: (0xF719, 0xF89C), 0x0E3A: (0xF71A, 0xF89D),
}
_PUA_MAP: dict[int, int] = {}
for _char, _codes in _PUA_TABLE.items():
    _PUA_MAP.update({code: _char for code in _codes})
for _char, _win, _mac in (
    # SDL
    (0x0E48, 0xF705, 0xF88C), (0x0E49, 0xF706, 0xF88F), (0x0E4A, 0xF707, 0xF892),
    (0x0E4B, 0xF708, 0xF895), (0x0E4C, 0xF709, 0xF898),
    # SL
    (0x0E48, 0xF713, 0xF88A), (0x0E49, 0xF714, 0xF88D), (0x0E4A, 0xF715, 0xF890),
    (0x0E4B, 0xF716, 0xF893), (0x0E4C, 0xF717, 0xF896), (0x0E31, 0xF710, 0xF884),
    (0x0E34, 0xF701, 0xF885), (0x0E35, 0xF702, 0xF886), (0x0E36, 0xF703, 0xF887),
    (0x0E37, 0xF704, 0xF888), (0x0E47, 0xF712, 0xF889), (0x0E4D, 0xF711, 0xF899),
    # RD
    (0x0E0D, 0xF70F, 0xF89A), (0x0E10, 0xF700, 0xF89E),
):
    _PUA_MAP[_win] = _PUA_MAP[_mac] = _char
del _char, _codes, _win, _mac
# U+F71B..U+F71D in some fonts (the Mac range ends higher): not in HarfBuzz's table and
# not assigned consistently; left alone.

# Glyphs whose character the extractor did not know. U+0000 and U+FFFD carry no identity;
# the Supplementary Private Use Area-B code points are placeholders that do (one per glyph
# of one font), put there by the extractor (see glyph_placeholder) or for pdfminer's
# "(cid:N)".
PLACEHOLDER_BASE = 0x100000
PLACEHOLDER_LIMIT = 0x10FFFD
_CID_PLACEHOLDER_BASE = 0x10C000  # "(cid:N)" of pdfminer; extractors allocate below it
_UNKNOWN_RE = re.compile("[\x00\ufffd\U00100000-\U0010fffd]+")
_CID_RE = re.compile(r"\(cid:(\d{1,5})\)")


def glyph_placeholder(index: int) -> str:
    """The placeholder character for unknown glyph number ``index`` (0 .. 49151)."""
    if not 0 <= index < _CID_PLACEHOLDER_BASE - PLACEHOLDER_BASE:
        raise ValueError(f"glyph placeholder index out of range: {index}")
    return chr(PLACEHOLDER_BASE + index)


# ----------------------------------------------------------------------------- dictionary


@lru_cache(maxsize=1)
def _lexicon() -> tuple[frozenset[str], dict[str, float], float]:
    """(dictionary words, log probability of each word in the TNC corpus, floor for a
    dictionary word the corpus lacks). Loaded once, on first use (about 0.3 s)."""
    from pythainlp.corpus import tnc
    from pythainlp.corpus.common import thai_words

    words = frozenset(thai_words())
    freqs = dict(tnc.word_freqs())
    total = float(sum(freqs.values())) or 1.0
    logp = {word: math.log(count / total) for word, count in freqs.items() if count > 0}
    return words, logp, math.log(0.5 / total)


def _tokenize(text: str) -> list[str]:
    from pythainlp.tokenize import word_tokenize

    return word_tokenize(text, engine="newmm")


_OOV_PER_CHAR = -22.0  # below the rarest word of the corpus (about -17.3)


@lru_cache(maxsize=65536)
def _score(window: str) -> float:
    """Unigram log probability of ``window`` as the Thai dictionary segments it."""
    words, logp, floor = _lexicon()
    total = 0.0
    for token in _tokenize(window):
        if not any(is_thai(c) for c in token):
            continue
        if token in logp:
            total += logp[token]
        elif token in words:
            total += _compound_logp(token)
        else:
            total += _OOV_PER_CHAR * len(token)
    return total


@lru_cache(maxsize=65536)
def _compound_logp(word: str) -> float:
    """Log probability of a dictionary word the corpus has no count for: a compound
    (ปีก่อน) is about as likely as its two parts in a row, else the floor."""
    _, logp, floor = _lexicon()
    best = floor
    for cut in range(1, len(word)):
        left, right = word[:cut], word[cut:]
        if left in logp and right in logp:
            best = max(best, logp[left] + logp[right])
    return best


# ----------------------------------------------------------------------------- character repairs

_MARK_CLASS = f"[{MARKS}]"
_DETACHED_MARK = re.compile(rf"(?<=[\u0E01-\u0E4E])[ \t\u00a0]+(?=[{MARKS}{NON_INITIAL}])")
_DETACHED_MARK_LINE = re.compile(rf"(?<=[\u0E01-\u0E4E])[ \t\u00a0]*\n[ \t\u00a0]*(?=[{MARKS}{NON_INITIAL}])")
_DETACHED_LEADING = re.compile(
    rf"(?<=[{LEADING_VOWELS}])(?:[ \t\u00a0]+\n?|\n)[ \t\u00a0]*(?=[{CONSONANTS}])")
# Marks standing alone between spaces (" ่ ้ ่"): glyphs drawn on their own, no syllable's.
_ORPHAN_MARKS = re.compile(rf"(?:(?<=\s)|^)[{MARKS}]+(?:[ \t\u00a0]+[{MARKS}]+)+(?=\s|$)", re.M)
_ORPHAN_LINE = re.compile(rf"^[ \t\u00a0]*[{MARKS}]+(?:[ \t\u00a0]+[{MARKS}]+)+[ \t\u00a0]*\n", re.M)
_CLUSTER = re.compile(rf"(^|[^{MARKS}])([{MARKS}]+)", re.M)
_SARA_AM = re.compile(f"{NIKHAHIT}([{TONE_MARKS}]?){SARA_AA}")
_MARK_RUN = re.compile(f"{_MARK_CLASS}{{2,}}")
_INVISIBLE = str.maketrans({"\u00ad": None, "\ufeff": None, "\u200b": None})


def _mark_order(mark: str) -> int:
    return 1 if mark in _TOP_MARKS else 0


def _reorder_marks(match: re.Match) -> str:
    marks = sorted(match.group(0), key=_mark_order)  # stable: vowels first, then tone marks
    out = [marks[0]]
    for mark in marks[1:]:
        if mark != out[-1]:  # the same mark twice: drawn twice (fake bold), typed once
            out.append(mark)
    return "".join(out)


def _sort_marks(match: re.Match) -> str:
    return "".join(sorted(match.group(0), key=_mark_order))


def _compose(text: str, *, dedupe: bool = True) -> str:
    """SARA AM recomposed and marks in canonical order (a mark repeated kept once)."""
    text = _SARA_AM.sub(lambda m: m.group(1) + SARA_AM, text)
    return _MARK_RUN.sub(_reorder_marks if dedupe else _sort_marks, text)


def repair_characters(text: str) -> str:
    """Character-level repairs that need no dictionary: private-use glyph code points,
    SARA AM written as NIKHAHIT + SARA AA, marks out of order, marks and vowels that a
    space or line break detached from their syllable. ``(cid:N)`` becomes a placeholder."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    if "(cid:" in text:
        text = _CID_RE.sub(lambda m: chr(_CID_PLACEHOLDER_BASE + min(int(m.group(1)), 0x3FFD)), text)
    text = "".join(chr(_PUA_MAP.get(ord(c), ord(c))) for c in text) if any(
        "\uf700" <= c <= "\uf89e" for c in text) else text
    return _reattach(unicodedata.normalize("NFC", text))


def _reattach(text: str) -> str:
    """Marks and vowels that a space or line break detached joined to their syllable, then
    SARA AM recomposed and marks ordered."""
    text = _ORPHAN_LINE.sub("", text)
    text = _ORPHAN_MARKS.sub("", text)
    text = _DETACHED_MARK_LINE.sub("", text)
    text = _DETACHED_MARK.sub("", text)
    text = _DETACHED_LEADING.sub("", text)
    return _CLUSTER.sub(_fix_cluster, _compose(text))


def _fix_cluster(match: re.Match) -> str:
    """A base and its marks: marks on no consonant dropped, at most one vowel and one tone
    mark kept (the first of each). Unknown glyphs count as bases: they are decided later."""
    base, marks = match.group(1), match.group(2)
    if base and (base in _CONSONANT_SET or _UNKNOWN_RE.match(base)):
        if _UNKNOWN_RE.match(base):
            return base + marks
        vowel = next((m for m in marks if m in _VOWEL_MARKS), "")
        top = next((m for m in marks if m in _TOP_MARKS), "")
        if vowel == "\u0E47":  # MAITAIKHU takes no tone mark
            top = ""
        return base + vowel + top
    return base  # marks on a vowel, a space, a digit, the start: stray glyphs


# ----------------------------------------------------------------------------- unknown glyphs

_SINGLE_FILLS = list(ABOVE_VOWELS + BELOW_VOWELS + TONE_MARKS + THANTHAKHAT + NIKHAHIT)
_PAIR_FILLS = ([v + t for v in "\u0E31\u0E34\u0E35\u0E36\u0E37\u0E38\u0E39" for t in TONE_MARKS + THANTHAKHAT]
               + [NIKHAHIT + t for t in TONE_MARKS])
_FILLS = _SINGLE_FILLS + _PAIR_FILLS
_PAIR_PENALTY = 1.0  # two marks from one glyph: a little less likely than one
_CONTEXT = 10  # characters either side of an unknown glyph that decide it
_MAX_SCORED_SLOTS = 8000  # occurrences scored in one document; later ones reuse answers or go
_MAX_VOTES = 24  # occurrences of one glyph that vote on its character


def _valid_cluster(window: str, start: int, end: int) -> bool:
    """Whether the marks around window[start:end] form a valid Thai cluster."""
    i = start
    while i > 0 and window[i - 1] in _MARK_SET:
        i -= 1
    j = end
    while j < len(window) and window[j] in _MARK_SET:
        j += 1
    marks = window[i:j]
    if not marks:
        return True
    if i == 0 or window[i - 1] not in _CONSONANT_SET:
        return False
    vowels = sum(1 for m in marks if m in _VOWEL_MARKS)
    tops = sum(1 for m in marks if m in _TOP_MARKS)
    if vowels > 1 or tops > 1:
        return False
    if "\u0E47" in marks and tops:  # MAITAIKHU takes no tone mark
        return False
    if j < len(window) and window[j] == SARA_AM and vowels:
        return False
    return True


def _fill_known(segment: str, known: dict[str, str]) -> str:
    return _UNKNOWN_RE.sub(lambda m: "".join(known.get(c, "") for c in m.group(0)), segment)


def _left_context(before: str) -> str:
    """The end of ``before`` within its run of non-space characters."""
    before = before[-_CONTEXT:]
    cut = max(before.rfind(" "), before.rfind("\n"), before.rfind("\t"), before.rfind("\f"))
    return before[cut + 1:]


def _right_context(after: str) -> str:
    after = after[:_CONTEXT]
    cut = min((i for i in (after.find(" "), after.find("\n"), after.find("\t"), after.find("\f"))
               if i >= 0), default=len(after))
    return after[:cut]


def _context(text: str, start: int, end: int, known: dict[str, str]) -> tuple[str, str]:
    """Text left and right of text[start:end] within one run of non-space characters, with
    the unknown glyphs already decided filled in and the others left out."""
    left = _left_context(_fill_known(text[max(0, start - 3 * _CONTEXT):start], known))
    right = _right_context(_fill_known(text[end:end + 3 * _CONTEXT], known))
    return left, right


def _candidate_score(left: str, fill: str, right: str) -> float | None:
    """Score of ``fill`` between ``left`` and ``right``; None when it makes no valid Thai."""
    left_c, right_c = _compose(left), _compose(right)
    window = _compose(left_c + fill + right_c, dedupe=False)
    # the filled part, located again after recomposition (SARA AM may have absorbed it)
    start = len(left_c)
    while start > 0 and window[start - 1] in _MARK_SET:
        start -= 1
    end = start
    while end < len(window) and window[end] in _MARK_SET:
        end += 1
    if not _valid_cluster(window, start, end):
        return None
    return _score(window) - (_PAIR_PENALTY if len(fill) > 1 else 0.0)


_DESCENDER_CONSONANTS = ("\u0E0D", "\u0E10")  # ญ ฐ, drawn without their descender over ุ ู
_INVALID = -50.0  # a candidate that makes no valid Thai in one occurrence, against the best one


def _fills_for(glyphs: int) -> list[str]:
    """Candidates for ``glyphs`` unknown glyphs in a row: each draws at least one character."""
    fills = [fill for fill in _FILLS if len(fill) >= glyphs]
    return fills + list(_DESCENDER_CONSONANTS) if glyphs == 1 else fills


def _best_fill(occurrences: list[tuple[str, str]], glyphs: int = 1) -> str:
    """The fill that does best over the occurrences ('' when none is valid anywhere).

    In each occurrence the candidates are scored against that occurrence's best (0), a
    candidate that makes invalid Thai there gets :data:`_INVALID`; the sums decide.
    """
    fills = _fills_for(glyphs)
    totals = dict.fromkeys(fills, 0.0)
    valid: Counter[str] = Counter()
    for left, right in occurrences:
        if not (left and is_thai(left[-1])):
            continue  # not attached to a Thai syllable: no evidence
        scores: dict[str, float] = {}
        for fill in fills:
            if fill in _DESCENDER_CONSONANTS and right[:1] not in BELOW_VOWELS:
                continue
            score = _candidate_score(left, fill, right)
            if score is not None:
                scores[fill] = score
        if not scores:
            continue
        best = max(scores.values())
        for fill in fills:
            if fill in scores:
                totals[fill] += scores[fill] - best
                valid[fill] += 1
            else:
                totals[fill] += _INVALID
    if not valid:
        return ""
    return max(valid, key=lambda fill: (totals[fill], valid[fill]))


def resolve_unknown_glyphs(text: str) -> str:
    """Replace unknown glyphs (U+0000, U+FFFD, placeholders) with the Thai marks that
    the dictionary finds most likely; unknown glyphs outside Thai words are dropped."""
    if not _UNKNOWN_RE.search(text):
        return text
    known: dict[str, str] = {}

    # 1. glyphs with an identity: decided once each, most frequent first, by their occurrences
    identities = Counter(c for c in text if "\U00100000" <= c <= "\U0010fffd")
    positions: dict[str, list[int]] = defaultdict(list)
    for index, char in enumerate(text):
        if char in identities:
            positions[char].append(index)
    scored = 0  # occurrences scored, identities and others together: bounds the work
    for char, _count in identities.most_common():
        if scored >= _MAX_SCORED_SLOTS:  # thousands of distinct glyphs: a hostile file
            known[char] = ""
            continue
        spots = positions[char]
        step = max(1, len(spots) // _MAX_VOTES)
        occurrences = [_context(text, i, i + 1, known) for i in spots[::step][:_MAX_VOTES]]
        scored += len(occurrences)
        known[char] = _best_fill(occurrences)
    if identities:
        text = "".join(known.get(c, c) for c in text)

    # 2. glyphs without identity (NUL, U+FFFD): one at a time, left to right
    out: list[str] = []
    tail = ""  # the end of the output so far, for the left context
    cursor = 0
    learned: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for match in _UNKNOWN_RE.finditer(text):
        start, end = match.span()
        piece = text[cursor:start]
        out.append(piece)
        tail = (tail + piece)[-3 * _CONTEXT:]
        left = _left_context(tail)
        right = _right_context(_UNKNOWN_RE.sub("", text[end:end + 3 * _CONTEXT]))
        key = (left[-2:], right[:2])
        if scored < _MAX_SCORED_SLOTS:
            fill = _best_fill([(left, right)], glyphs=end - start)
            scored += 1
            learned[key][fill] += 1
        else:
            fill = learned[key].most_common(1)[0][0] if learned.get(key) else ""
        out.append(fill)
        tail = (tail + fill)[-3 * _CONTEXT:]
        cursor = end
    out.append(text[cursor:])
    return _compose("".join(out))


# ----------------------------------------------------------------------------- page furniture

_DIGITS = re.compile(r"[0-9\u0E50-\u0E59]+")
_PAGE_NUMBER = re.compile(
    r"^[\s\-\u2013\u2014(\[]*(?:(?:page|p\.|หน้า(?:ที่)?)\s*)?[0-9\u0E50-\u0E59]{1,6}"
    r"(?:\s*(?:/|of|จาก|ใน)\s*[0-9\u0E50-\u0E59]{1,6})?[\s\-\u2013\u2014)\]]*$",
    re.IGNORECASE,
)
_MARKED_PAGE_NUMBER = re.compile(
    r"^\s*(?:(?:page|p\.|หน้า(?:ที่)?)\s*[0-9\u0E50-\u0E59]{1,6}(?:\s*(?:/|of|จาก|ใน)\s*[0-9\u0E50-\u0E59]{1,6})?"
    r"|[-\u2013\u2014]\s*[0-9\u0E50-\u0E59]{1,6}\s*[-\u2013\u2014]"
    r"|[0-9\u0E50-\u0E59]{1,6}\s*(?:/|of|จาก)\s*[0-9\u0E50-\u0E59]{1,6})\s*$",
    re.IGNORECASE,
)
_EDGE_LINES = 3  # lines at the top and at the bottom of a page that may be furniture
_MAX_FURNITURE_CHARS = 200


def _furniture_key(line: str) -> str:
    return _DIGITS.sub("#", " ".join(line.split()))


def is_page_number(line: str) -> bool:
    """A line that is only a page number: "12", "- 12 -", "หน้า 12", "Page 3 of 10"."""
    return bool(_PAGE_NUMBER.match(line)) and bool(_DIGITS.search(line))


def strip_page_furniture(pages: Sequence[str]) -> list[str]:
    """Pages without the header and footer lines repeated on most pages and without page
    numbers at their top or bottom. Only the first and last few lines of a page are looked at."""
    split = [page.split("\n") for page in pages]
    edges: list[list[int]] = []
    for lines in split:
        filled = [i for i, line in enumerate(lines) if line.strip()]
        edges.append(sorted(set(filled[:_EDGE_LINES] + filled[-_EDGE_LINES:])))
    counts: Counter[str] = Counter()
    for lines, idx in zip(split, edges, strict=True):
        counts.update({_furniture_key(lines[i]) for i in idx
                       if len(lines[i].strip()) <= _MAX_FURNITURE_CHARS})
    # "most pages": at least half of them, and at least two
    threshold = max(2, math.ceil(len(pages) / 2))
    repeated = {key for key, count in counts.items() if count >= threshold and key}
    result = []
    for lines, idx in zip(split, edges, strict=True):
        drop = {i for i in idx if _furniture_key(lines[i]) in repeated or is_page_number(lines[i])}
        result.append("\n".join(line for i, line in enumerate(lines) if i not in drop))
    return result


def _drop_marked_page_numbers(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not _MARKED_PAGE_NUMBER.match(line))


# ----------------------------------------------------------------------------- line and space joins

_JOIN_WINDOW = 12


def _width(line: str) -> int:
    return sum(1 for c in line if c not in _MARK_SET)


_JOIN_MARGIN = 8.0  # log-probability gain that says a space or line break split one word


def _splits_word(left: str, right: str) -> bool:
    """Whether the break between ``left`` and ``right`` (their last/first few characters)
    split a word: the text reads much more likely to the dictionary without it. Measured
    on the corpus: broken words gain 10 to 60 (ประ|ชาชน 18, สวัส|ดี 18, ชว่|ง 60), two
    words side by side -9 to 2 (ไป|มา -9, แล้ว|แต่ 2), compounds in between (ต้น|ไม้ 7)."""
    left, right = left[-_JOIN_WINDOW:], right[:_JOIN_WINDOW]
    return _score(left + right) - _score(left) - _score(right) > _JOIN_MARGIN


def _join_spaces(line: str) -> str:
    """Single spaces between Thai characters removed where they split one dictionary word."""
    if " " not in line:
        return line
    parts = line.split(" ")
    out = parts[0]
    for part in parts[1:]:
        if out and part and is_thai(out[-1]) and is_thai(part[0]) and _splits_word(out, part):
            out += part
            continue
        out += " " + part
    return out


def join_broken_lines(text: str) -> str:
    """Join the lines that the page layout broke: a line as wide as the page's text
    continues on the next; a Thai line also continues when the join makes a dictionary
    word of the broken pieces. Thai joins with nothing (Thai puts no spaces between words)
    unless the extractor kept a space at the break; other scripts join with a space. Blank
    lines (paragraph breaks) stay."""
    raw = text.split("\n")
    lines = [line.strip() for line in raw]
    widths = sorted(_width(line) for line in lines if line)
    if not widths:
        return ""
    full = widths[int(0.8 * (len(widths) - 1))] if len(widths) >= 5 else widths[-1]
    out: list[str] = []
    previous, previous_raw = "", ""  # the last physical line
    for line, line_raw in zip(lines, raw, strict=True):
        joined = False
        if out and line and previous:
            wide = len(widths) >= 5 and _width(previous) >= 0.8 * full  # too few lines: no measure
            spaced = previous_raw[-1:].isspace() or line_raw[:1].isspace()
            a, b = previous[-1], line[0]
            if is_thai(a) and is_thai(b):
                # a wide line wraps; a short one (a paragraph's last) only when the break
                # split a word
                if wide or _splits_word(previous, line):
                    out[-1] += (" " if spaced else "") + line
                    joined = True
            elif wide and a not in ".!?:;" and (a.isalnum() or a in ",-)\"'") and (
                    b.isalnum() or b in "(\"'"):
                out[-1] += ("" if a == "-" and not spaced else " ") + line
                joined = True
        if not joined:
            out.append(line)
        previous, previous_raw = line, line_raw
    return "\n".join(out)


# Spaces extractors put where the font changes (Thai letters and Latin punctuation often
# come from different subsets of a font): before . , : ; ! ? ) and after ( next to Thai.
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=[\u0E01-\u0E5B])[ \t]+(?=[.,:;!?)\]}])")
_SPACE_AFTER_OPEN = re.compile(r"(?<=[(\[{])[ \t]+(?=[\u0E01-\u0E5B])")
_CURLY_QUOTES = re.compile(r"(\u201c)[ \t]+|[ \t]+(\u201d)")


def _tighten_punctuation(line: str) -> str:
    """Spaces inside quotes and before closing punctuation removed, next to Thai text."""
    if not any(is_thai(c) for c in line):
        return line
    line = _SPACE_BEFORE_PUNCT.sub("", line)
    line = _SPACE_AFTER_OPEN.sub("", line)
    line = _CURLY_QUOTES.sub(lambda m: m.group(1) or m.group(2), line)
    if line.count('"') % 2 == 0 and '"' in line:  # straight quotes in pairs: open, close
        parts = line.split('"')
        for i in range(1, len(parts), 2):
            parts[i] = parts[i].strip(" \t")
        line = '"'.join(parts)
    return line


# ----------------------------------------------------------------------------- entry points

_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def clean_thai_pdf_pages(pages: Sequence[str]) -> str:
    """The text of a PDF's pages, repaired (see the module documentation), as one string
    with paragraphs separated by line breaks."""
    repaired = [_SPACES.sub(" ", repair_characters(page.replace("\f", "\n"))) for page in pages]
    # unknown glyphs are decided over the whole document (one glyph, one character)
    joined = _reattach(resolve_unknown_glyphs("\f".join(repaired)))
    repaired = joined.split("\f") if len(repaired) > 1 else [joined.replace("\f", "\n")]
    if len(repaired) > 1:
        repaired = strip_page_furniture(repaired)
    else:
        repaired = [_drop_marked_page_numbers(repaired[0])]
    text = join_broken_lines("\n".join(page.strip(" \n") for page in repaired))
    text = "\n".join(_tighten_punctuation(_join_spaces(_SPACES.sub(" ", line).strip()))
                     for line in text.split("\n"))
    text = _BLANKS.sub("\n\n", text)
    return unicodedata.normalize("NFC", text).strip()


def clean_thai_pdf_text(text: str) -> str:
    """:func:`clean_thai_pdf_pages` for one string; form feeds (``\\f``) separate pages,
    without them headers and footers cannot be told from text and stay (page numbers
    written as such, "หน้า 3" or "- 3 -", still go)."""
    return clean_thai_pdf_pages(text.split("\f"))
