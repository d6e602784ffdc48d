"""Text of a PDF, read defensively (pypdf), with Thai glyphs repaired.

pypdf's own resource limits apply (decompression, arrays, page tree depth, the parsing work
of one content stream); a page tree claiming more pages than allowed is refused before it
is walked; and a budget of time, operators and XObjects drawn is checked before each
operator pypdf runs, inside a page (forms drawing forms fan out), not only between pages.

Before extraction, glyphs that a font's ``/ToUnicode`` maps to U+0000 get their character
from the embedded font's own cmap when it has one, else a placeholder per glyph that the
cleanup decides from the Thai dictionary (:mod:`api.documents.thai_pdf`); paragraph breaks
come from the vertical gaps between lines.
"""

from __future__ import annotations

import io
import logging
import re
import time

from api.documents.errors import (
    DocumentTooComplexError,
    EncryptedDocumentError,
    MalformedDocumentError,
    ScannedPdfError,
    TooManyPagesError,
)
from api.documents.thai_pdf import clean_thai_pdf_pages, glyph_placeholder

log = logging.getLogger("thai.documents")

PDF_TIME_BUDGET_S = 120.0  # reading all pages; checked between pages and inside a page
PDF_MAX_OPERATORS_PER_PAGE = 1_000_000  # content-stream operators run for one page, forms included
PDF_MAX_XOBJECTS_PER_PAGE = 2_000  # XObjects drawn (Do) for one page, forms inside forms included
PDF_SCANNED_CHARS_PER_PAGE = 16  # fewer visible characters per page than this, with images: scanned
PDF_MAX_PLACEHOLDERS = 40000
PDF_MAX_CMAP_CODES = 2_000_000  # code points read from embedded fonts' cmaps, all fonts together

_BFCHAR_BLOCK = re.compile(rb"beginbfchar(.*?)endbfchar", re.S)
_NULL_TARGET = re.compile(rb"<([0-9A-Fa-f]{2,8})>\s*<0000>")


def _utf16_hex(char: str) -> bytes:
    return char.encode("utf-16-be").hex().upper().encode()


_SUBSET_TAG = re.compile(r"^[A-Z]{6}\+")
_MAPPED_ENTRY = re.compile(rb"<([0-9A-Fa-f]{2,8})>\s*<([0-9A-Fa-f]{4,64})>")


def _truetype_cmap(font_file: bytes, budget: list[int]) -> dict[int, str]:
    """Glyph id -> character from an embedded TrueType font's own ``cmap`` table (Unicode
    subtables, formats 4 and 12); {} when there is none or it does not parse. ``budget``
    ([code points left]) bounds the work over all the fonts of a document."""
    import struct

    def spend(count: int) -> None:
        budget[0] -= count
        if budget[0] < 0:
            raise ValueError("cmap budget spent")

    try:
        tables = {}
        for index in range(min(struct.unpack_from(">H", font_file, 4)[0], 64)):
            tag, _, offset, length = struct.unpack_from(">4sIII", font_file, 12 + 16 * index)
            tables[tag] = (offset, length)
        if b"cmap" not in tables:
            return {}
        base, _ = tables[b"cmap"]
        subtables = {}
        for index in range(min(struct.unpack_from(">H", font_file, base + 2)[0], 32)):
            platform, encoding, offset = struct.unpack_from(">HHI", font_file, base + 4 + 8 * index)
            subtables[(platform, encoding)] = base + offset
        glyphs: dict[int, str] = {}
        for key in ((3, 10), (0, 4), (3, 1), (0, 3)):
            start = subtables.get(key)
            if start is None:
                continue
            fmt = struct.unpack_from(">H", font_file, start)[0]
            if fmt == 4:
                segments = struct.unpack_from(">H", font_file, start + 6)[0] // 2
                ends = struct.unpack_from(f">{segments}H", font_file, start + 14)
                starts = struct.unpack_from(f">{segments}H", font_file, start + 16 + 2 * segments)
                deltas = struct.unpack_from(f">{segments}h", font_file, start + 16 + 4 * segments)
                range_base = start + 16 + 6 * segments
                offsets = struct.unpack_from(f">{segments}H", font_file, range_base)
                for i in range(segments):
                    spend(max(0, min(ends[i], 0xFFFE) + 1 - starts[i]))
                    for code in range(starts[i], min(ends[i], 0xFFFE) + 1):
                        if offsets[i]:
                            at = range_base + 2 * i + offsets[i] + 2 * (code - starts[i])
                            gid = struct.unpack_from(">H", font_file, at)[0]
                            gid = (gid + deltas[i]) & 0xFFFF if gid else 0
                        else:
                            gid = (code + deltas[i]) & 0xFFFF
                        if gid:
                            glyphs.setdefault(gid, chr(code))
            elif fmt == 12:
                groups = min(struct.unpack_from(">I", font_file, start + 12)[0], 10000)
                for i in range(groups):
                    first, last, gid = struct.unpack_from(">III", font_file, start + 16 + 12 * i)
                    spend(max(0, min(last, 0x10FFFF) + 1 - first))
                    for code in range(first, min(last, 0x10FFFF) + 1):
                        if not 0xD800 <= code <= 0xDFFF:
                            glyphs.setdefault(gid + code - first, chr(code))
            if glyphs:
                return glyphs
        return glyphs
    except (struct.error, ValueError, OverflowError):
        return {}


def _embedded_glyph_chars(font, cache: dict[int, dict[int, str]], budget: list[int]) -> dict[int, str]:
    """Code -> character from the embedded font program of a Type0 font with Identity
    encoding (code = CID = glyph id): what its /ToUnicode should have said. ``cache``
    holds the font programs already read, by object identity."""
    try:
        if font.get("/Subtype") != "/Type0" or font.get("/Encoding") != "/Identity-H":
            return {}
        descendant = font["/DescendantFonts"][0].get_object()
        if descendant.get("/CIDToGIDMap", "/Identity") != "/Identity":
            return {}
        font_file = descendant["/FontDescriptor"].get_object().get("/FontFile2")
        if font_file is None:
            return {}
        font_file = font_file.get_object()
        if id(font_file) not in cache:
            cache[id(font_file)] = _truetype_cmap(font_file.get_data(), budget)
        return cache[id(font_file)]
    except Exception:
        return {}


class _GlyphPlaceholders:
    """Gives each glyph that a font's /ToUnicode maps to U+0000 its character from the
    embedded font's own cmap when that has it, else a placeholder of its own.

    Chromium (Skia) and other PDF writers map the positional variants of Thai marks (a tone
    mark raised above a vowel, a vowel shifted left of ป ฝ ฟ) to U+0000, so every variant
    extracts as the same NUL. With a placeholder per glyph, the cleanup decides each glyph
    once from all its occurrences (see api.documents.thai_pdf.resolve_unknown_glyphs).

    Writers embed a subset of the font on every page; subsets of one font (same name once
    the ``ABCDEF+`` tag is dropped) whose mapped codes agree share placeholders, so a glyph
    is one placeholder in the whole document.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.count = 0
        # font name -> [(code -> text of the mapped codes, code -> placeholder)], one per
        # family of agreeing subsets
        self.fonts: dict[str, list[tuple[dict[bytes, bytes], dict[bytes, str]]]] = {}
        self.font_programs: dict[int, dict[int, str]] = {}  # id of a FontFile2 -> its cmap
        self.cmap_budget = [PDF_MAX_CMAP_CODES]
        self.visited: set[int] = set()  # form XObjects whose resources were patched

    def patch_page(self, page) -> None:
        try:
            self._patch_resources(page.get("/Resources"), 0)
        except Exception as exc:  # a damaged font dictionary: extraction copes without it
            log.debug("glyph placeholders skipped: %r", exc)

    def _patch_resources(self, resources, depth: int) -> None:
        if resources is None or depth > 3:
            return
        resources = resources.get_object()
        fonts = resources.get("/Font")
        if fonts is not None:
            for font in fonts.get_object().values():
                self._patch_font(font.get_object())
        xobjects = resources.get("/XObject")
        if xobjects is not None:
            for xobject in xobjects.get_object().values():
                xobject = xobject.get_object()
                # each form once: forms that draw each other many times fan out
                if xobject.get("/Subtype") == "/Form" and id(xobject) not in self.visited:
                    self.visited.add(id(xobject))
                    self._patch_resources(xobject.get("/Resources"), depth + 1)

    def _family(self, name: str, mapped: dict[bytes, bytes]) -> dict[bytes, str]:
        families = self.fonts.setdefault(name, [])
        for known, placeholders in families:
            if all(known.get(code, target) == target for code, target in mapped.items()):
                known.update(mapped)
                return placeholders
        families.append((dict(mapped), {}))
        return families[-1][1]

    def _patch_font(self, font) -> None:
        stream = font.get("/ToUnicode")
        if stream is None:
            return
        stream = stream.get_object()
        if id(stream) in self.seen or not hasattr(stream, "get_data"):
            return
        self.seen.add(id(stream))
        data = stream.get_data()
        if b"<0000>" not in data:
            return
        # glyphs the font's own cmap knows (the writer lost them, not the font): theirs
        embedded = {code: char for code, char in _embedded_glyph_chars(
                        font, self.font_programs, self.cmap_budget).items()
                    if char.isprintable()}
        mapped: dict[bytes, bytes] = {}
        for block in _BFCHAR_BLOCK.findall(data):
            for code, target in _MAPPED_ENTRY.findall(block):
                if target == b"0000" and int(code, 16) in embedded:
                    target = _utf16_hex(embedded[int(code, 16)])
                if target != b"0000":
                    mapped[code.upper()] = target.upper()
        name = _SUBSET_TAG.sub("", str(font.get("/BaseFont", "")))
        placeholders = self._family(name, mapped)

        def replace(entry: re.Match) -> bytes:
            code = entry.group(1).upper()
            known = embedded.get(int(code, 16))
            if known is not None:
                return b"<" + entry.group(1) + b"> <" + _utf16_hex(known) + b">"
            char = placeholders.get(code)
            if char is None:
                if self.count >= PDF_MAX_PLACEHOLDERS:
                    return entry.group(0)
                char = placeholders[code] = glyph_placeholder(self.count)
                self.count += 1
            return b"<" + entry.group(1) + b"> <" + _utf16_hex(char) + b">"

        patched = _BFCHAR_BLOCK.sub(
            lambda block: b"beginbfchar" + _NULL_TARGET.sub(replace, block.group(1)) + b"endbfchar", data)
        if patched != data:
            stream.set_data(patched)  # Flate re-encoded; other filters raise: caught above


PARAGRAPH_GAP = 1.35  # a gap between lines this many times the usual one ends a paragraph


class _PageBudgetSpent(BaseException):
    """Raised from inside pypdf's extraction when a page overruns its budget.

    A ``BaseException``: pypdf catches ``Exception`` around each form XObject it draws (and
    goes on with the next operator), so an ``Exception`` would only end the innermost form.
    """


class _PageBudget:
    """Operators and time for one page, checked before each operator pypdf runs (forms
    included): the budget holds inside a page, not only between pages."""

    def __init__(self, deadline: float, budget_s: float, number: int) -> None:
        self.deadline, self.budget_s, self.number = deadline, budget_s, number
        self.operators = self.drawn = 0
        self.reason = ""

    def __call__(self, operator, operands, cm, tm) -> None:
        self.operators += 1
        if operator == b"Do":  # a form is read again at each use: forms drawing forms fan out
            self.drawn += 1
            if self.drawn > PDF_MAX_XOBJECTS_PER_PAGE:
                self.reason = (f"page {self.number} draws more than {PDF_MAX_XOBJECTS_PER_PAGE:,} "
                               "XObjects (forms drawing forms)")
                raise _PageBudgetSpent()
        if self.operators > PDF_MAX_OPERATORS_PER_PAGE:
            self.reason = (f"page {self.number} runs more than {PDF_MAX_OPERATORS_PER_PAGE:,} "
                           "drawing operators")
            raise _PageBudgetSpent()
        if self.operators % 1024 == 0 and time.monotonic() > self.deadline:
            self.reason = (f"it took over {self.budget_s:.0f} s (stopped inside page "
                           f"{self.number})")
            raise _PageBudgetSpent()


def _page_text(page, budget: _PageBudget | None = None) -> str:
    """The page's text (pypdf, content-stream order) with a blank line where the vertical
    gap between two lines is wider than the page's usual line spacing: a paragraph break,
    which plain extraction loses."""
    pieces: list[tuple[str, float]] = []

    def visit(text, cm, tm, font_dict, font_size) -> None:
        if text:
            try:
                y = float(tm[4]) * float(cm[1]) + float(tm[5]) * float(cm[3]) + float(cm[5])
            except (TypeError, ValueError, IndexError):
                y = float("nan")
            pieces.append((text, y))

    plain = page.extract_text(visitor_text=visit, visitor_operand_before=budget) or ""
    if "".join(text for text, _ in pieces) != plain:
        return plain
    lines: list[tuple[str, float | None]] = []
    current: list[str] = []
    line_y: float | None = None
    for text, y in pieces:
        for index, segment in enumerate(text.split("\n")):
            if index:
                lines.append(("".join(current), line_y))
                current, line_y = [], None
            if segment:
                current.append(segment)
                if line_y is None and segment.strip() and y == y:  # (NaN != NaN)
                    line_y = y
    lines.append(("".join(current), line_y))
    ys = [y for line, y in lines if y is not None and line.strip()]
    gaps = sorted(abs(a - b) for a, b in zip(ys, ys[1:], strict=False) if abs(a - b) > 0.5)
    if len(gaps) < 3:
        return plain
    usual = gaps[len(gaps) // 2]
    out: list[str] = []
    previous: float | None = None
    for line, y in lines:
        if y is not None and previous is not None and line.strip():
            gap = previous - y  # y grows up the page
            if gap > PARAGRAPH_GAP * usual or gap < -0.5 * usual:
                out.append("")
        out.append(line)
        if y is not None and line.strip():
            previous = y
    return "\n".join(out)


def _has_images(page) -> bool:
    try:
        xobjects = page["/Resources"].get_object().get("/XObject")
        if xobjects is None:
            return False
        return any(x.get_object().get("/Subtype") == "/Image" for x in xobjects.get_object().values())
    except Exception:
        return False


def read_pdf(data: bytes, max_pages: int, time_budget_s: float = PDF_TIME_BUDGET_S) -> tuple[str, int]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
    except MemoryError:
        raise
    except Exception as exc:  # pypdf raises many kinds on a damaged file
        raise MalformedDocumentError(f"The PDF is damaged and cannot be read ({type(exc).__name__}).") from None
    if encrypted:
        try:
            opened = reader.decrypt("")  # "owner-password" PDFs open without a password
        except MemoryError:
            raise
        except Exception:  # DependencyError (AES without cryptography), a damaged /Encrypt
            opened = 0
        if not opened:
            raise EncryptedDocumentError("The PDF is encrypted (password-protected); this server "
                                         "cannot open it. Upload an unprotected copy.")
    try:
        declared = reader.trailer["/Root"]["/Pages"]["/Count"]
        declared = int(declared) if isinstance(declared, int) else 0
    except Exception:
        declared = 0
    if declared > max_pages:  # refused before walking a page tree it says is this big
        raise TooManyPagesError(declared, max_pages, kind="PDF")
    try:
        pages = list(reader.pages)
    except MemoryError:
        raise
    except Exception as exc:  # LimitReachedError (depth, entries), PdfReadError, ...
        raise MalformedDocumentError(f"The PDF's page tree is damaged ({type(exc).__name__}).") from None
    if len(pages) > max_pages:
        raise TooManyPagesError(len(pages), max_pages, kind="PDF")
    if not pages:
        raise MalformedDocumentError("The PDF has no pages.")

    placeholders = _GlyphPlaceholders()
    texts: list[str] = []
    failures = 0
    deadline = time.monotonic() + time_budget_s
    for number, page in enumerate(pages, start=1):
        if time.monotonic() > deadline:
            raise DocumentTooComplexError(f"Reading the PDF took over {time_budget_s:.0f} s "
                                          f"(stopped at page {number} of {len(pages)}).")
        placeholders.patch_page(page)
        budget = _PageBudget(deadline, time_budget_s, number)
        try:
            texts.append(_page_text(page, budget))
        except _PageBudgetSpent:
            raise DocumentTooComplexError(f"The PDF is too costly to read: {budget.reason}."
                                          ) from None
        except MemoryError:
            raise
        except Exception as exc:  # one damaged page: the others are still read
            failures += 1
            log.info("PDF page %d could not be read: %r", number, exc)
            texts.append("")
    if failures == len(pages):
        raise MalformedDocumentError("The PDF is damaged: none of its pages could be read.")
    text = clean_thai_pdf_pages(texts)
    visible = sum(1 for c in text if not c.isspace())
    if visible < PDF_SCANNED_CHARS_PER_PAGE * len(pages):
        with_images = sum(1 for page in pages if _has_images(page))
        if with_images * 2 >= len(pages):
            raise ScannedPdfError(len(pages))
    return text, len(pages)
