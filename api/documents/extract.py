"""Text of an uploaded document: .txt, .md, .html/.htm, .docx and .pdf.

:func:`extract_document` takes the bytes and the name the client gave, checks the size,
tells the type by the extension *and* the content (a ``.pdf`` must start like a PDF, a
``.docx`` must be a zip with ``word/document.xml``, a ``.txt`` must not be either) and
returns the text with its page count. Anything it cannot read raises a
:class:`~api.documents.errors.DocumentError` subclass whose message says why, in words for
the person who uploaded the file: never a crash, never a hang. Hostile files are expected:
zip bombs and .docx parts of millions of tiny paragraphs (:mod:`api.documents.docx_text`:
sizes from the zip's directory, elements counted in the bytes before a tree is built), PDFs
claiming millions of pages or whose forms fan out (:mod:`api.documents.pdf_text`: the page
tree's count, a budget of time, operators and XObjects checked inside each page), deeply
nested HTML (the parser keeps counters, not a tree), NUL bytes, truncated and malformed
files. Callers run this in a sandboxed process (:mod:`api.documents.pool`), whose memory
and CPU limits are the last line.

PDF text comes from pypdf (it kept Thai in logical order where pdfplumber reorders marks
and splits words: ``bench/pdf_recovery.py`` measures both), Thai glyphs repaired
(:mod:`api.documents.pdf_text`).

No HTTP here: bytes in, text or a ``DocumentError`` out.
"""

from __future__ import annotations

import io
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from typing import Literal

from api.documents.docx_text import read_docx
from api.documents.errors import (
    DocumentEncodingError,
    DocumentTooLargeError,
    DocumentTypeMismatchError,
    EmptyDocumentError,
    EncryptedDocumentError,
    MalformedDocumentError,
    UnsupportedDocumentError,
)
from api.documents.pdf_text import PDF_TIME_BUDGET_S, read_pdf
from api.text import normalize_text

DocumentKind = Literal["txt", "md", "html", "docx", "pdf"]

EXTENSIONS: dict[str, DocumentKind] = {
    "txt": "txt", "text": "txt", "md": "md", "markdown": "md",
    "html": "html", "htm": "html", "docx": "docx", "pdf": "pdf",
}
MAX_FILENAME_CHARS = 128


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
        text, pages = read_docx(data, max_pages)
    else:
        text, pages = read_pdf(data, max_pages, time_budget_s)
    text = normalize_text(text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    if not text.strip():
        raise EmptyDocumentError("The document contains no text.")
    return ExtractedDocument(text=text, filename=name, kind=kind, pages=pages, characters=len(text))
