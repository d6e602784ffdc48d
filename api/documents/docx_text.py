"""Text of a Word (.docx) document, read defensively.

A .docx is a zip of XML parts. Before anything is parsed, what the zip's directory declares
is checked (parts, sizes, compression ratios: zipfile never inflates past the declared
sizes), then the elements of every part are counted in its bytes as it is inflated
(paragraphs, runs and table cells, and elements in all), so a part of millions of tiny
paragraphs is refused before lxml and python-docx build a tree of it. Only then does
python-docx read the body: paragraphs and tables (one row a line, cells tab-separated) in
document order.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib

from api.documents.errors import (
    DocumentTooComplexError,
    EncryptedDocumentError,
    MalformedDocumentError,
    TooManyPagesError,
)

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


def read_docx(data: bytes, max_pages: int) -> tuple[str, int | None]:
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
