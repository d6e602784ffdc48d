"""Text of an uploaded document: .txt, .md, .html/.htm, .docx and .pdf.

:func:`extract_document` takes the bytes and the name the client gave, checks the size,
tells the type by the extension *and* the content (a ``.pdf`` must start like a PDF, a
``.docx`` must be a zip with ``word/document.xml``, a ``.txt`` must not be either) and
returns the text with its page count. Anything it cannot read raises a
:class:`~api.documents.errors.DocumentError` subclass whose message says why, in words for
the person who uploaded the file: never a crash, never a hang. Hostile files are expected:
zip bombs (a .docx's parts are sized from the zip's directory before anything is
decompressed, and zipfile never inflates past those sizes), .docx parts of millions of tiny
paragraphs (elements counted in the bytes before a tree is built), PDFs claiming millions of
pages (refused from the page tree's count, before the tree is walked), deeply nested HTML
(the parser keeps counters, not a tree), NUL bytes, truncated and malformed files. PDF
parsing relies on pypdf's own resource limits (decompression, arrays, page tree depth, the
parsing work of one content stream) and a budget of time, operators and XObjects drawn,
checked before each operator, inside a page (forms drawing forms fan out). Callers run this in a sandboxed process
(:mod:`api.documents.pool`), whose memory and CPU limits are the last line.

PDF text comes from pypdf (it kept Thai in logical order where pdfplumber reorders marks
and splits words: ``bench/pdf_recovery.py`` measures both). Before extraction, glyphs that a
font's ``/ToUnicode`` maps to U+0000 get their character from the embedded font's own cmap
when it has one, else a placeholder per glyph that the cleanup decides from the Thai
dictionary (:mod:`api.documents.thai_pdf`); paragraph breaks come from the vertical gaps
between lines.

No HTTP here: bytes in, text or a ``DocumentError`` out.
"""

from __future__ import annotations

import io
import logging
import re
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Literal

from api.documents.errors import (
    DocumentEncodingError,
    DocumentTooComplexError,
    DocumentTooLargeError,
    DocumentTypeMismatchError,
    EmptyDocumentError,
    EncryptedDocumentError,
    MalformedDocumentError,
    ScannedPdfError,
    TooManyPagesError,
    UnsupportedDocumentError,
)
from api.documents.thai_pdf import clean_thai_pdf_pages, glyph_placeholder
from api.text import normalize_text

log = logging.getLogger("thai.documents")

DocumentKind = Literal["txt", "md", "html", "docx", "pdf"]

EXTENSIONS: dict[str, DocumentKind] = {
    "txt": "txt", "text": "txt", "md": "md", "markdown": "md",
    "html": "html", "htm": "html", "docx": "docx", "pdf": "pdf",
}
MAX_FILENAME_CHARS = 128

# .docx: a zip of XML parts. Limits on what its directory declares, checked before reading.
DOCX_MAX_ENTRIES = 2000
DOCX_MAX_UNCOMPRESSED = 256 * 1024 * 1024  # all parts together
DOCX_MAX_PART = 64 * 1024 * 1024  # one part (word/document.xml included)
DOCX_MAX_RATIO = 200  # uncompressed / compressed, for parts over 1 MiB
DOCX_MAX_TABLE_DEPTH = 8
# Counted in the XML parts' bytes before lxml and python-docx build a tree of them (a node
# costs a few hundred bytes there: 60 MiB of tiny paragraphs would be ~3 M nodes, >1 GB).
# A 300-page report has some 10^4 paragraphs and 10^5 elements.
DOCX_MAX_BLOCKS = 300_000  # paragraphs, runs and table cells (<w:p>, <w:r>, <w:tc>)
DOCX_MAX_ELEMENTS = 2_000_000  # elements of every XML part together

PDF_TIME_BUDGET_S = 120.0  # reading all pages; checked between pages and inside a page
PDF_MAX_OPERATORS_PER_PAGE = 1_000_000  # content-stream operators run for one page, forms included
PDF_MAX_XOBJECTS_PER_PAGE = 2_000  # XObjects drawn (Do) for one page, forms inside forms included
PDF_SCANNED_CHARS_PER_PAGE = 16  # fewer visible characters per page than this, with images: scanned
PDF_MAX_PLACEHOLDERS = 40000
PDF_MAX_CMAP_CODES = 2_000_000  # code points read from embedded fonts' cmaps, all fonts together


@dataclass(frozen=True)
class ExtractedDocument:
    text: str
    filename: str  # the client's name, base name only, sanitised and clipped
    kind: DocumentKind
    pages: int | None  # PDF pages; .docx pages as Word last counted them; None when unknown
    characters: int


# ----------------------------------------------------------------------------- names and types

_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def sanitize_filename(name: str | None) -> str:
    """The base name of ``name`` (no folders, no control or bidi characters), NFC,
    at most :data:`MAX_FILENAME_CHARS` characters with the extension kept."""
    name = unicodedata.normalize("NFC", str(name or ""))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _NAME_JUNK.sub("", name).strip().rstrip(". ")  # Windows drops trailing dots
    if not name:
        return "document"
    if len(name) > MAX_FILENAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 16:
            name = stem[:MAX_FILENAME_CHARS - len(ext) - 2] + "…." + ext
        else:
            name = name[:MAX_FILENAME_CHARS - 1] + "…"
    return name


def _extension(name: str) -> str:
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot else ""


_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_BINARY_MAGIC = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip archive", b"Rar!": "a RAR archive", b"7z\xbc\xaf": "a 7-Zip archive",
    b"{\\rtf": "an RTF document", b"\x7fELF": "a program", b"MZ": "a Windows program",
}


def _sniff(data: bytes) -> tuple[str, str]:
    """(kind, description) of the content: pdf, docx, zip, ole, binary or text."""
    if b"%PDF-" in data[:1024]:
        return "pdf", "a PDF document"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = set(archive.namelist())
        except MemoryError:
            raise
        except Exception:  # BadZipFile, NotImplementedError (odd versions), struct.error, ...
            return "zip", "a damaged zip archive"
        if "word/document.xml" in names:
            return "docx", "a Word document"
        if "xl/workbook.xml" in names:
            return "zip", "an Excel workbook"
        if "ppt/presentation.xml" in names:
            return "zip", "a PowerPoint presentation"
        if "content.xml" in names:
            return "zip", "an OpenDocument file"
        return "zip", "a zip archive"
    if data.startswith(_OLE_MAGIC):
        if "EncryptionInfo".encode("utf-16-le") in data:
            return "ole", "a password-protected Office document"
        return "ole", "a legacy Office document (.doc, .xls or .ppt)"
    for magic, what in _BINARY_MAGIC.items():
        if data.startswith(magic):
            return "binary", what
    head = data[:8192]
    if not head.startswith(_BOMS) and not head.startswith(b"\x00\x00\xfe\xff"):
        if b"\x00" in data:
            return "binary", "a binary file (it contains NUL bytes; UTF-16 text needs a byte order mark)"
        controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
        if controls > max(8, len(head) // 100):
            return "binary", "a binary file"
    return "text", "text"


def _detect_kind(data: bytes, filename: str) -> DocumentKind:
    ext = _extension(filename)
    kind = EXTENSIONS.get(ext)
    if kind is None:
        what = f"The file type .{ext[:16]}" if ext else "A file without an extension"
        raise UnsupportedDocumentError(f"{what} is not supported.")
    content, description = _sniff(data)
    if content == "ole" and kind == "docx" and "password" in description:
        raise EncryptedDocumentError("The Word document is password-protected; remove the "
                                     "password (or save an unprotected copy) and upload again.")
    expected = {"txt": "text", "md": "text", "html": "text", "docx": "docx", "pdf": "pdf"}[kind]
    if content != expected:
        if content == "ole" and kind == "docx":
            raise DocumentTypeMismatchError("The file is named .docx but it is a legacy Word "
                                            ".doc (or another old Office format); save it as .docx.")
        raise DocumentTypeMismatchError(f"The file is named .{ext} but its content is {description}.")
    return kind


# ----------------------------------------------------------------------------- text encodings

def _is_plausible_thai(text: str) -> bool:
    """Text decoded as TIS-620/Windows-874 that reads as Thai: it has Thai letters, and
    combining marks follow a consonant or another mark (Latin-1 bytes decoded as Thai do not)."""
    from api.documents.thai_pdf import CONSONANTS, MARKS

    consonants, marks = set(CONSONANTS), set(MARKS)
    runs = [len(run) for run in re.findall("[\u0e01-\u0e5b]+", text)]
    # real Thai has words; bytes of another 8-bit encoding give lone letters among Latin ones
    if not runs or max(runs) < 3 or sum(1 for n in runs if n < 3) > len(runs) // 2:
        return False
    bad = total = 0
    previous = ""
    for char in text:
        if char in marks:
            total += 1
            if previous not in consonants and previous not in marks:
                bad += 1
        previous = char
    return bad <= max(1, total // 50)


def decode_text(data: bytes) -> str:
    """Bytes of a text file as str: UTF-8 (a BOM is dropped), UTF-16/32 with a BOM, or Thai
    TIS-620/Windows-874 when the bytes are not UTF-8 and read as Thai in that encoding."""
    if data.startswith(b"\xef\xbb\xbf"):
        encoding, body = "utf-8", data[3:]
    elif data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        encoding, body = "utf-32", data
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding, body = "utf-16", data
    else:
        encoding, body = "", data
    if encoding:
        try:
            return body.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DocumentEncodingError(
                f"The file starts with a {encoding.upper()} byte order mark but is not valid "
                f"{encoding.upper()} (byte {exc.start}: {exc.reason}).") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        thai = body.decode("cp874")  # Windows-874: TIS-620 plus a few punctuation marks
    except UnicodeDecodeError:
        thai = None
    if thai is not None and _is_plausible_thai(thai):
        return thai
    bad = body[utf8_error.start:utf8_error.start + 1].hex()
    raise DocumentEncodingError(
        f"The file is not valid UTF-8 (byte 0x{bad} at position {utf8_error.start}: "
        f"{utf8_error.reason}), nor UTF-16 with a byte order mark, nor Thai TIS-620/Windows-874. "
        "Save it as UTF-8 and upload again.")


# ----------------------------------------------------------------------------- HTML

_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption center details dialog div dl fieldset "
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 header hgroup hr html main menu nav ol "
    "p pre section summary table tbody tfoot thead title ul".split())
_LINE_TAGS = frozenset("br li dd dt tr option".split())
_SKIP_TAGS = frozenset("script style template noscript svg math object canvas iframe".split())
_CELL_TAGS = frozenset(("td", "th"))


class _HTMLText:
    """Visible text of an HTML page: script and style dropped, blocks as paragraphs.

    An lxml (libxml2) parser target: it gets the parser's start/end/data events and keeps
    counters, not a tree, so nesting depth costs nothing. (CPython's html.parser is
    quadratic on some malformed input, e.g. "<a" repeated, before 3.11.13: CVE-2025-6069.)
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0
        self.pending = ""  # a break owed before the next text: "\n", "\n\n" or a cell's "\t"
        self.at_line_start = True

    def _brk(self, kind: str) -> None:
        if self.parts and len(kind) > len(self.pending.strip("\t")):
            self.pending = kind

    def start(self, tag, attrib) -> None:
        tag = tag.lower() if isinstance(tag, str) else ""
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
            self._brk("\n\n")
        elif tag in _CELL_TAGS:
            if not self.at_line_start and not self.pending:
                self.pending = "\t"
        elif tag in _LINE_TAGS:
            self._brk("\n")
        elif tag in _BLOCK_TAGS:
            self._brk("\n\n")

    def end(self, tag) -> None:
        tag = tag.lower() if isinstance(tag, str) else ""
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._brk("\n\n")
        elif tag in _BLOCK_TAGS:
            self._brk("\n\n")
        elif tag in _LINE_TAGS and tag != "br":
            self._brk("\n")

    def data(self, data: str) -> None:
        if self.skip or not data:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self.at_line_start or self.pending or (self.parts and self.parts[-1].endswith(" ")):
                data = data.lstrip(" ")
            if not data:
                return
        if self.pending:
            if self.parts and self.pending != "\t":
                self.parts[-1] = self.parts[-1].rstrip(" ")
            self.parts.append(self.pending)
            self.at_line_start = self.pending != "\t"
            self.pending = ""
        self.parts.append(data)
        self.at_line_start = data.endswith("\n")

    def comment(self, text) -> None:
        pass

    def close(self) -> str:
        return "".join(self.parts)


def html_to_text(html: str) -> str:
    """The visible text of ``html`` (control characters must already be gone)."""
    from lxml import etree

    parser = etree.HTMLParser(target=_HTMLText(), recover=True, no_network=True,
                              remove_comments=True, remove_pis=True)
    try:
        parser.feed(html)
        return parser.close() or ""
    except (etree.Error, ValueError) as exc:  # lxml refuses some input outright
        raise MalformedDocumentError(f"The HTML could not be read: {str(exc)[:200]}.") from None


# ----------------------------------------------------------------------------- DOCX

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_EP = "{http://schemas.openxmlformats.org/officeDocument/2006/extended-properties}"


def _check_docx_archive(archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    if len(infos) > DOCX_MAX_ENTRIES:
        raise DocumentTooComplexError(f"The Word document has {len(infos)} parts; at most "
                                      f"{DOCX_MAX_ENTRIES} are read.")
    total = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise EncryptedDocumentError("The Word document's parts are encrypted.")
        total += info.file_size
        too_big = info.file_size > DOCX_MAX_PART
        bomb = info.file_size > 1024 * 1024 and info.file_size > DOCX_MAX_RATIO * max(1, info.compress_size)
        if too_big or bomb:
            raise DocumentTooComplexError(
                f"The Word document's part {info.filename[:64]!r} expands to {info.file_size} bytes "
                f"from {info.compress_size}; this looks like a zip bomb and is not read.")
    if total > DOCX_MAX_UNCOMPRESSED:
        raise DocumentTooComplexError(f"The Word document expands to {total} bytes, over the "
                                      f"{DOCX_MAX_UNCOMPRESSED} bytes read from one document.")


# An element's start tag with any namespace prefix: "<w:p>", "<w:p ...", "<w:p/>"; and any
# start tag at all (not "</", "<!", "<?").
_DOCX_BLOCK_TAG = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?(?:p|r|tc)[\s/>]")
_XML_START_TAG = re.compile(rb"<[A-Za-z_]")
_SCAN_CHUNK = 1024 * 1024


def _count_docx_elements(archive: zipfile.ZipFile) -> None:
    """Refuse a document whose XML parts hold more paragraphs, runs and cells than
    :data:`DOCX_MAX_BLOCKS`, or more elements than :data:`DOCX_MAX_ELEMENTS`, counted in the
    parts' bytes as they are inflated (a regex over 1 MiB pieces, nothing kept), before any
    XML parser builds a tree. Tags that are not elements (in comments, CDATA, images' bytes)
    only count more, never less."""
    blocks = elements = 0
    for info in archive.infolist():  # every part: python-docx goes by content type, not name
        tail = b""
        with archive.open(info) as part:
            while True:
                chunk = part.read(_SCAN_CHUNK)
                if not chunk:
                    break
                data = tail + chunk
                last = data.rfind(b"<", max(0, len(data) - 64))  # a tag split between
                cut = last if last >= 0 else len(data)  # pieces is counted in the next one
                blocks += len(_DOCX_BLOCK_TAG.findall(data, 0, cut))
                elements += len(_XML_START_TAG.findall(data, 0, cut))
                tail = data[cut:]
                if blocks > DOCX_MAX_BLOCKS or elements > DOCX_MAX_ELEMENTS:
                    what = (f"more than {DOCX_MAX_BLOCKS:,} paragraphs, runs and table cells"
                            if blocks > DOCX_MAX_BLOCKS else
                            f"more than {DOCX_MAX_ELEMENTS:,} XML elements")
                    raise DocumentTooComplexError(
                        f"The Word document has {what} (counted up to "
                        f"{info.filename[:64]!r}); this server reads at most that many.")
        blocks += len(_DOCX_BLOCK_TAG.findall(tail + b" "))
        elements += len(_XML_START_TAG.findall(tail))
    if blocks > DOCX_MAX_BLOCKS or elements > DOCX_MAX_ELEMENTS:
        raise DocumentTooComplexError(
            f"The Word document has more than {DOCX_MAX_BLOCKS:,} paragraphs, runs and table "
            f"cells or {DOCX_MAX_ELEMENTS:,} XML elements; this server reads at most that many.")


def _docx_pages(archive: zipfile.ZipFile) -> int | None:
    """<Pages> of docProps/app.xml: the count Word saved with the document (None if absent)."""
    try:
        info = archive.getinfo("docProps/app.xml")
    except KeyError:
        return None
    if info.file_size > 1024 * 1024:
        return None
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(archive.read(info), parser)
    except MemoryError:
        raise
    except Exception:  # damaged part or XML: the page count is only informative
        return None
    pages = root.find(f"{_EP}Pages")
    if pages is None or not (pages.text or "").strip().isdigit():
        return None
    return int(pages.text.strip())


def _docx_blocks(container, depth: int = 0) -> list[str]:
    """Paragraphs (and tables, one row a line, cells tab-separated) in document order."""
    from docx.text.paragraph import Paragraph

    blocks: list[str] = []
    for child in container.iterchildren():
        tag = child.tag
        if tag == f"{_W}p":
            blocks.append(Paragraph(child, None).text)
        elif tag == f"{_W}tbl":
            if depth >= DOCX_MAX_TABLE_DEPTH:
                continue
            for row in child.iterchildren(f"{_W}tr"):
                cells = []
                for cell in row.iterchildren(f"{_W}tc"):
                    # each <w:tc> once: a merged cell is one cell (python-docx's row.cells
                    # would repeat it gridSpan times, and gridSpan is the file's to choose)
                    cells.append(" ".join(b for b in _docx_blocks(cell, depth + 1) if b.strip()))
                if any(c.strip() for c in cells):
                    blocks.append("\t".join(cells))
        elif tag in (f"{_W}sdt", f"{_W}sdtContent", f"{_W}customXml", f"{_W}smartTag"):
            if depth < DOCX_MAX_TABLE_DEPTH:
                blocks.extend(_docx_blocks(child, depth + 1))
    return blocks


def _docx_text(data: bytes, max_pages: int) -> tuple[str, int | None]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, NotImplementedError, struct.error, ...
        raise MalformedDocumentError(f"The Word document is damaged: {str(exc)[:200]}.") from None
    with archive:
        _check_docx_archive(archive)
        try:
            _count_docx_elements(archive)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise MalformedDocumentError(f"The Word document is damaged: {str(exc)[:200]}.") from None
        pages = _docx_pages(archive)
    if pages is not None and pages > max_pages:
        raise TooManyPagesError(pages, max_pages, kind="Word document")
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
        body = document.element.body
        text = "\n".join(_docx_blocks(body))
    except MemoryError:
        raise
    except Exception as exc:  # python-docx, lxml and zipfile raise many kinds on a bad file
        reason = str(exc).split("\n")[0][:200] or type(exc).__name__
        raise MalformedDocumentError(f"The Word document is damaged or not a valid .docx: {reason}.") from None
    return text, pages


# ----------------------------------------------------------------------------- PDF

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


def _pdf_text(data: bytes, max_pages: int, time_budget_s: float = PDF_TIME_BUDGET_S) -> tuple[str, int]:
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


# ----------------------------------------------------------------------------- entry point

def extract_document(data: bytes, filename: str, *, max_bytes: int, max_pages: int,
                     time_budget_s: float = PDF_TIME_BUDGET_S) -> ExtractedDocument:
    """The text of one uploaded document (see the module documentation).

    Raises :class:`~api.documents.errors.DocumentError` subclasses: too large (HTTP 413),
    too many pages, unsupported or mismatched type, bad encoding, malformed, encrypted,
    scanned PDF, empty (HTTP 400).
    """
    if len(data) > max_bytes:
        raise DocumentTooLargeError(len(data), max_bytes)
    name = sanitize_filename(filename)
    if not data:
        raise EmptyDocumentError("The file is empty.")
    kind = _detect_kind(data, name)
    pages: int | None = None
    if kind in ("txt", "md"):
        text = decode_text(data)
    elif kind == "html":
        text = html_to_text(normalize_text(decode_text(data)))
    elif kind == "docx":
        text, pages = _docx_text(data, max_pages)
    else:
        text, pages = _pdf_text(data, max_pages, time_budget_s)
    text = normalize_text(text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    if not text.strip():
        raise EmptyDocumentError("The document contains no text.")
    return ExtractedDocument(text=text, filename=name, kind=kind, pages=pages, characters=len(text))
