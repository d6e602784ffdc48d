"""api.documents: text out of uploaded files, Thai PDF repair, long-text splitting.

Real files, made here: .txt/.md/.html written directly, .docx with python-docx, PDFs
printed by headless Chromium from Thai HTML set in the bundled Sarabun font (with a
running header and page numbers). The PDF text is measured against its source before and
after cleanup; the cleanup is also tested on synthetic damage that Chromium does not make
(private-use glyphs, split SARA AM, detached marks, broken lines, repeated headers).
Hostile files (zip bombs, lying page counts, deep HTML, NUL bytes, random corruption)
must give a DocumentError quickly, never a crash or a hang: "quickly" is this process's CPU
seconds (time.process_time), which another program's load on the machine does not inflate.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import random
import re
import time
import unicodedata
import zipfile

import pytest

from api.documents import errors as E
from api.documents.chunking import split_text
from api.documents.extract import ExtractedDocument, extract_document, sanitize_filename
from api.documents.thai_pdf import (
    clean_thai_pdf_pages,
    clean_thai_pdf_text,
    glyph_placeholder,
    repair_characters,
    resolve_unknown_glyphs,
)
from api.errors import status_for
from bench.pdf_recovery import (
    HEADER,
    corpus_paragraphs,
    launch_chromium,
    measure,
    print_pdf,
    pypdf_pages,
    similarity,
    thai_html,
    thai_recovered,
)
from tests.support import ARTIFACTS, REPO, require_tool

MB = 1024 * 1024
LIMITS = {"max_bytes": 20 * MB, "max_pages": 300}
THAI_TONES = "\u0e48\u0e49\u0e4a\u0e4b"


def extract(data: bytes, name: str, **limits) -> ExtractedDocument:
    return extract_document(data, name, **{**LIMITS, **limits})


def no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def paragraphs(count: int, start: int = 0) -> list[str]:
    return corpus_paragraphs(count, start)


# ====================================================================== errors and statuses

@pytest.mark.parametrize("error, status, code", [
    (E.DocumentTooLargeError(30, 20), 413, "document_too_large"),
    (E.TooManyPagesError(400, 300), 400, "document_too_many_pages"),
    (E.UnsupportedDocumentError("x."), 400, "unsupported_document_type"),
    (E.DocumentTypeMismatchError("x."), 400, "document_type_mismatch"),
    (E.DocumentEncodingError("x"), 400, "document_encoding"),
    (E.MalformedDocumentError("x"), 400, "malformed_document"),
    (E.DocumentTooComplexError("x"), 400, "document_too_complex"),
    (E.EncryptedDocumentError("x"), 400, "document_encrypted"),
    (E.ScannedPdfError(3), 400, "pdf_without_text_layer"),
    (E.EmptyDocumentError("x"), 400, "document_empty"),
])
def test_errors_map_to_statuses_and_codes(error, status, code):
    assert status_for(error) == (status, "invalid_request_error", code)
    assert error.param == "file"
    copy = pickle.loads(pickle.dumps(error))  # they cross process boundaries intact
    assert type(copy) is type(error) and copy.message == error.message
    assert status_for(copy) == status_for(error) and str(copy) == str(error)


# ====================================================================== names, sizes, types

@pytest.mark.parametrize("given, expected", [
    ("report.txt", "report.txt"),
    ("../../etc/passwd.txt", "passwd.txt"),
    ("C:\\Users\\somchai\\รายงาน ประจำปี.docx", "รายงาน ประจำปี.docx"),
    ("/tmp/a/b/\x00evil\x07.pdf", "evil.pdf"),
    ("invoice\u202egpj.txt", "invoicegpj.txt"),  # no right-to-left override spoofing
    ("notes.txt. . ", "notes.txt"),
    ("", "document"),
    ("../", "document"),
])
def test_filename_is_a_sanitised_base_name(given, expected):
    assert sanitize_filename(given) == expected


def test_long_filename_is_clipped_keeping_the_extension():
    name = sanitize_filename("ก" * 500 + ".pdf")
    assert len(name) <= 128 and name.endswith(".pdf")
    doc = extract("ข้อความ".encode(), "x" * 1000 + ".txt")
    assert len(doc.filename) <= 128 and doc.filename.endswith(".txt")


def test_over_max_bytes_is_413_naming_the_limit():
    with pytest.raises(E.DocumentTooLargeError) as caught:
        extract(b"a" * 2049, "big.txt", max_bytes=2048)
    assert status_for(caught.value)[0] == 413
    assert "2048 bytes" in caught.value.message
    extract(b"a" * 2048, "ok.txt", max_bytes=2048)  # the limit itself is allowed


@pytest.mark.parametrize("name", ["virus.exe", "slides.pptx", "old.doc", "README", "data.csv"])
def test_unknown_extension_lists_the_supported_types(name):
    with pytest.raises(E.UnsupportedDocumentError) as caught:
        extract(b"hello", name)
    for kind in (".txt", ".md", ".html", ".docx", ".pdf"):
        assert kind in caught.value.message


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("data, name, says", [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "notes.txt", "PDF"),
    ("ข้อความธรรมดา".encode(), "report.pdf", "text"),
    (b"just text", "letter.docx", "text"),
    (_zip({"xl/workbook.xml": b"<x/>"}), "book.docx", "Excel"),
    (_zip({"a.txt": b"x"}), "archive.docx", "zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, "old.docx", ".doc"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "image.html", "PNG"),
    (b"abc\x00def", "nul.txt", "NUL"),
    (b"MZ\x90\x00\x03", "prog.md", "program"),
])
def test_extension_and_content_must_agree(data, name, says):
    with pytest.raises(E.UnsupportedDocumentError) as caught:  # mismatch is a subclass
        extract(data, name)
    assert says in caught.value.message
    assert "Supported types" in caught.value.message


def test_password_protected_word_file_says_encrypted():
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 512 + "EncryptionInfo".encode("utf-16-le")
    with pytest.raises(E.EncryptedDocumentError):
        extract(ole, "secret.docx")


@pytest.mark.parametrize("data", [b"", b"   \n\t\n", "\ufeff".encode(), b"\xef\xbb\xbf  \n"])
def test_empty_documents(data):
    with pytest.raises(E.EmptyDocumentError):
        extract(data, "empty.txt")


# ====================================================================== text files

def test_txt_utf8_and_bom():
    text = "\n".join(paragraphs(3))
    plain = extract(text.encode(), "a.txt")
    assert plain.text == text and plain.kind == "txt" and plain.pages is None
    assert plain.characters == len(text)
    assert extract(b"\xef\xbb\xbf" + text.encode(), "a.txt").text == text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_txt_utf16_and_utf32_with_bom(encoding):
    text = "สวัสดีครับ\nบรรทัดที่สอง"
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    assert extract(bom + text.encode(encoding), "u.txt").text == text


def test_txt_thai_legacy_encoding_tis620_cp874():
    text = "\n".join(paragraphs(2))
    legacy = text.encode("cp874")
    with pytest.raises(UnicodeDecodeError):
        legacy.decode("utf-8")
    assert extract(legacy, "legacy.txt").text == text
    assert extract("ภาษาไทย".encode("tis-620"), "t.md").text == "ภาษาไทย"


@pytest.mark.parametrize("data", [
    "café résumé naïve".encode("latin-1"),  # Latin-1: not UTF-8, and not Thai either
    b"\xff\xfe\x00",  # a UTF-16 BOM, then half a character
    b"ok \xc3\x28 bad",
])
def test_undecodable_text_names_the_encoding_problem(data):
    with pytest.raises(E.DocumentEncodingError) as caught:
        extract(data, "bad.txt")
    assert "UTF" in caught.value.message


def test_markdown_is_kept_as_written():
    text = "# หัวข้อ\n\n- ข้อแรก\n- ข้อสอง\n\n**ตัวหนา** และ `code`"
    doc = extract(text.encode(), "notes.md")
    assert doc.kind == "md" and doc.text == text


def test_control_characters_are_removed_and_text_is_nfc():
    doc = extract("ก\u0e48\u0e35\x07ข\r\nค".encode(), "a.txt")  # tone then vowel: NFC keeps order
    assert "\x07" not in doc.text and "\r" not in doc.text


# ====================================================================== HTML

def test_html_text_only_with_paragraph_breaks():
    page = """<!doctype html><html><head><title>ข่าว</title>
    <style>p { color: red }</style><script>var x = "<p>ไม่ใช่ข้อความ</p>";</script></head>
    <body><h1>หัวข้อข่าว</h1><p>ย่อหน้าแรก &amp; ต่อ&nbsp;ไป</p>
    <p>ย่อหน้า<b>ที่</b>สอง<br>บรรทัดใหม่</p><!-- comment -->
    <ul><li>หนึ่ง</li><li>สอง</li></ul>
    <table><tr><td>ก</td><td>ข</td></tr><tr><td>ค</td><td>ง</td></tr></table>
    <noscript>เปิด JavaScript</noscript><template><p>แม่แบบ</p></template></body></html>"""
    doc = extract(page.encode(), "page.html")
    assert doc.kind == "html"
    assert doc.text == ("ข่าว\n\nหัวข้อข่าว\n\nย่อหน้าแรก & ต่อ ไป\n\nย่อหน้าที่สอง\nบรรทัดใหม่"
                        "\n\nหนึ่ง\nสอง\n\nก\tข\nค\tง")
    for hidden in ("color", "var x", "ไม่ใช่ข้อความ", "comment", "JavaScript", "แม่แบบ"):
        assert hidden not in doc.text


def test_html_in_thai_legacy_encoding_and_htm_extension():
    page = '<html><head><meta charset="windows-874"></head><body><p>ภาษาไทย</p></body></html>'
    assert extract(page.encode("cp874"), "old.htm").text == "ภาษาไทย"


def test_deeply_nested_html_is_linear():
    depth = 100_000
    page = "<div>" * depth + "<p>ลึกมาก</p>" + "</div>" * depth + "<p>หลังจากนั้น</p>"
    started = time.process_time()
    doc = extract(page.encode(), "deep.html")
    assert time.process_time() - started < 10
    assert doc.text == "ลึกมาก\n\nหลังจากนั้น"


@pytest.mark.parametrize("page", [
    "<a" * 300_000,  # quadratic in CPython's html.parser before 3.11.13
    "<!--" + "x" * 2_000_000,
    "</" * 300_000 + "<p>ท้าย",
    "<![" * 300_000,
    "<p " + "a=b " * 300_000 + ">ข้อความ",
    "<script>" + "<p>x" * 300_000,
])
def test_malformed_html_is_fast_and_clean(page):
    started = time.process_time()
    try:
        extract(page.encode(), "bad.html")
    except E.DocumentError:
        pass
    assert time.process_time() - started < 10


# ====================================================================== DOCX

def make_docx(blocks: list, *, pages: int | None = None) -> bytes:
    """A .docx made by python-docx: str items are paragraphs, list-of-lists items tables."""
    import docx

    document = docx.Document()
    for block in blocks:
        if isinstance(block, str):
            document.add_paragraph(block)
        else:
            table = document.add_table(rows=len(block), cols=len(block[0]))
            for r, row in enumerate(block):
                for c, value in enumerate(row):
                    table.cell(r, c).text = value
    buffer = io.BytesIO()
    document.save(buffer)
    data = buffer.getvalue()
    if pages is not None:
        data = _with_app_pages(data, pages)
    return data


def _with_app_pages(data: bytes, pages: int) -> bytes:
    app = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Properties xmlns='
           '"http://schemas.openxmlformats.org/officeDocument/2006/extended-properties">'
           f"<Pages>{pages}</Pages><Words>10</Words></Properties>").encode()
    return _rezip(data, {"docProps/app.xml": app})


def _rezip(data: bytes, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, replace.pop(info.filename, None) or source.read(info))
        for name, blob in {**replace, **(add or {})}.items():
            target.writestr(name, blob)
    return out.getvalue()


def test_docx_paragraphs_and_tables_in_order():
    text = paragraphs(3)
    data = make_docx([text[0], [["หัวข้อ", "ค่า"], ["อุณหภูมิ", "32 องศา"]], text[1], text[2]])
    doc = extract(data, "report.docx")
    assert doc.kind == "docx" and doc.pages == 1  # python-docx's template says <Pages>1</Pages>
    assert doc.text == "\n".join([text[0], "หัวข้อ\tค่า", "อุณหภูมิ\t32 องศา", text[1], text[2]])


def test_docx_pages_from_app_xml_and_the_page_limit():
    data = make_docx(["หน้าเดียว"], pages=5)
    assert extract(data, "a.docx").pages == 5
    no_count = ('<Properties xmlns="http://schemas.openxmlformats.org/officeDocument/2006/'
                'extended-properties"><Words>3</Words></Properties>').encode()
    assert extract(_rezip(data, {"docProps/app.xml": no_count}), "a.docx").pages is None
    with pytest.raises(E.TooManyPagesError) as caught:
        extract(make_docx(["ยาว"], pages=301), "long.docx")
    assert "300 pages" in caught.value.message and status_for(caught.value)[0] == 400


def test_docx_zip_bomb_is_refused_before_decompression():
    bomb = _rezip(make_docx(["x"]), {}, add={"word/media/bomb.bin": b"\0" * (80 * MB)})
    assert len(bomb) < 1 * MB
    started = time.process_time()
    with pytest.raises(E.DocumentTooComplexError) as caught:
        extract(bomb, "bomb.docx")
    assert time.process_time() - started < 5
    assert "zip bomb" in caught.value.message


def test_docx_with_too_many_parts():
    many = _rezip(make_docx(["x"]), {}, add={f"extra/item{i}.xml": b"<a/>" for i in range(2100)})
    with pytest.raises(E.DocumentTooComplexError):
        extract(many, "many.docx")


def test_docx_huge_grid_span_is_not_expanded():
    data = make_docx([[["เซลล์", "b"]]])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        xml = archive.read("word/document.xml").decode()
    xml = xml.replace("<w:tcPr>", '<w:tcPr><w:gridSpan w:val="2000000000"/>', 1)
    started = time.process_time()
    doc = extract(_rezip(data, {"word/document.xml": xml.encode()}), "span.docx")
    assert time.process_time() - started < 5 and "เซลล์" in doc.text


@pytest.mark.parametrize("document_xml", [
    b"<not xml",
    b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;'>"
    b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;'>]><d>&c;&c;&c;</d>",  # entity expansion
    b"<w:document xmlns:w='http://schemas.openxmlformats.org/wordprocessingml/2006/main'>"
    + b"<w:body>" * 5000 + b"</w:body>" * 5000 + b"</w:document>",  # too deep for libxml2
])
def test_malformed_docx_xml_is_a_clean_error(document_xml):
    data = _rezip(make_docx(["x"]), {"word/document.xml": document_xml})
    with pytest.raises(E.DocumentError):
        extract(data, "bad.docx")


def test_docx_zip_damaged():
    data = make_docx(["ข้อความ"])
    with pytest.raises(E.DocumentError):
        extract(data[: len(data) // 2], "half.docx")


# ====================================================================== PDF (Chromium + Sarabun)

PDF_PARAGRAPHS = 30


@pytest.fixture(scope="module")
def browser():
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, chromium)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def thai_pdf(browser, tmp_path_factory) -> tuple[bytes, str]:
    """(PDF bytes, source text): corpus paragraphs printed with a header and page numbers."""
    source = paragraphs(PDF_PARAGRAPHS)
    path = print_pdf(browser, thai_html(source), tmp_path_factory.mktemp("pdf") / "thai.pdf")
    return path.read_bytes(), "\n".join(source)


@pytest.fixture(scope="module")
def scanned_pdf(browser, tmp_path_factory) -> bytes:
    """A PDF of page images only: a screenshot of Thai text, printed."""
    page = browser.new_page(viewport={"width": 800, "height": 600})
    page.set_content(thai_html(paragraphs(3)))
    png = page.screenshot()
    page.close()
    image = base64.b64encode(png).decode()
    pages = "".join(f'<img src="data:image/png;base64,{image}" style="width:100%;'
                    'page-break-after:always">' for _ in range(2))
    path = tmp_path_factory.mktemp("scan") / "scan.pdf"
    return print_pdf(browser, f"<html><body style='margin:0'>{pages}</body></html>", path,
                     web_fonts=False).read_bytes()


def test_thai_pdf_recovery_before_and_after_cleanup(thai_pdf, tmp_path):
    data, source = thai_pdf
    path = tmp_path / "thai.pdf"
    path.write_bytes(data)
    raw_pages = pypdf_pages(path)
    raw = "\n".join(raw_pages)
    doc = extract(data, "thai.pdf")
    assert doc.kind == "pdf" and doc.pages == len(raw_pages) >= 2
    before, after = measure(source, raw), measure(source, doc.text)
    text_only = measure(source, clean_thai_pdf_pages(raw_pages))  # no glyph identities
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pdf_recovery.json").write_text(json.dumps(
        {"pages": doc.pages, "raw_pypdf": before, "text_cleanup": text_only, "extract_document": after},
        ensure_ascii=False, indent=2))
    # raw pypdf loses the positional variants of Thai marks (U+0000) and has the furniture
    assert "\x00" in raw and HEADER.replace("ำ", "\u0e4d\u0e32") in raw
    assert after["similarity"] >= 0.97 and after["thai_recovered"] >= 0.97  # the bar
    assert after["similarity"] > before["similarity"] and after["thai_recovered"] > before["thai_recovered"]
    assert text_only["similarity"] >= 0.97
    # header and page numbers are gone, paragraphs are kept as paragraphs
    assert HEADER not in doc.text and not re.search(r"หน้า\s*\d", doc.text)
    assert "\x00" not in doc.text and not re.search("[\U00100000-\U0010fffd\uf700-\uf8ff]", doc.text)
    assert doc.text.count("\n\n") >= PDF_PARAGRAPHS // 2


def _tounicode_all_null(data: bytes) -> bytes:
    """The PDF with every font's /ToUnicode mapping every glyph to U+0000: a writer that
    lost all the characters (the embedded fonts still have their cmap)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    for page in writer.pages:
        for font in page["/Resources"]["/Font"].values():
            stream = font.get_object()["/ToUnicode"].get_object()
            cmap = stream.get_data()
            codes: set[int] = set()
            for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap, re.S):
                codes |= {int(c, 16) for c in re.findall(rb"<([0-9A-Fa-f]+)>\s*<[0-9A-Fa-f]+>", block)}
            for block in re.findall(rb"beginbfrange(.*?)endbfrange", cmap, re.S):
                for a, b in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*<[0-9A-Fa-f]+>", block):
                    codes |= set(range(int(a, 16), int(b, 16) + 1))
            head = cmap[:cmap.index(b"endcodespacerange") + len(b"endcodespacerange")]
            stream.set_data(head + b"\n%d beginbfchar\n" % len(codes)
                            + b"".join(b"<%04X> <0000>\n" % code for code in sorted(codes))
                            + b"endbfchar\nendcmap\nCMapName currentdict /CMap defineresource pop\nend\nend")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_whose_tounicode_lost_every_character(thai_pdf):
    data, source = thai_pdf
    broken = _tounicode_all_null(data)
    from pypdf import PdfReader

    raw = "".join(page.extract_text() for page in PdfReader(io.BytesIO(broken)).pages)
    assert thai_recovered(source, raw) < 0.01  # nothing Thai left in the text layer
    doc = extract(broken, "lost.pdf")  # the embedded fonts' cmaps, then the dictionary
    assert similarity(source, doc.text) >= 0.97 and thai_recovered(source, doc.text) >= 0.97


def test_pdf_page_limit(thai_pdf):
    data, _ = thai_pdf
    with pytest.raises(E.TooManyPagesError) as caught:
        extract(data, "thai.pdf", max_pages=1)
    assert "limit of 1 pages" in caught.value.message and status_for(caught.value)[0] == 400


def test_scanned_pdf_says_ocr_is_not_supported(scanned_pdf):
    with pytest.raises(E.ScannedPdfError) as caught:
        extract(scanned_pdf, "scan.pdf")
    assert "scanned" in caught.value.message and "OCR is not supported" in caught.value.message


def _encrypted(data: bytes, user: str, owner: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user, owner_password=owner, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_encrypted_pdf(thai_pdf):
    data, source = thai_pdf
    with pytest.raises(E.EncryptedDocumentError) as caught:
        extract(_encrypted(data, "secret", "owner"), "locked.pdf")
    assert "password" in caught.value.message
    # "restricted" PDFs open without a password (every viewer shows them): read them
    opened = extract(_encrypted(data, "", "owner"), "restricted.pdf")
    assert similarity(source, opened.text) >= 0.97


def _pdf_with_objects(objects: list[bytes]) -> bytes:
    """A PDF file from numbered object bodies, with a correct xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def test_pdf_claiming_a_billion_pages_is_refused_at_once():
    data = _pdf_with_objects([b"<< /Type /Catalog /Pages 2 0 R >>",
                              b"<< /Type /Pages /Kids [3 0 R] /Count 1000000000 >>",
                              b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"])
    started = time.process_time()
    with pytest.raises(E.TooManyPagesError) as caught:
        extract(data, "huge.pdf")
    assert time.process_time() - started < 2 and "1000000000 pages" in caught.value.message


def test_pdf_with_more_pages_than_it_declares():
    kids = 5000
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Count 1 /Kids [" + b" ".join(b"%d 0 R" % (i + 3) for i in range(kids)) + b"] >>"]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * kids
    started = time.process_time()
    with pytest.raises(E.TooManyPagesError):
        extract(_pdf_with_objects(objects), "lying.pdf")
    assert time.process_time() - started < 20


def test_pdf_flate_bomb_in_a_content_stream():
    import zlib

    bomb = zlib.compress(b" " * (80 * MB), 9)  # over pypdf's 75 MB decompression limit
    data = _pdf_with_objects([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(bomb) + bomb + b"\nendstream"])
    started = time.process_time()
    with pytest.raises(E.DocumentError):
        extract(data, "bomb.pdf")
    assert time.process_time() - started < 30


@pytest.mark.parametrize("data", [
    b"%PDF-1.7\n",
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF",
    b"%PDF-" + b"\x00" * 5000,
    b"%PDF-1.7\n" + bytes(range(256)) * 40,
])
def test_malformed_pdfs_are_clean_errors(data):
    with pytest.raises(E.DocumentError):
        extract(data, "broken.pdf")


def test_corrupted_files_never_crash_or_hang(thai_pdf):
    """Random damage to a real PDF and a real .docx: a text or a DocumentError, quickly."""
    pdf, _ = thai_pdf
    docx_data = make_docx(paragraphs(5) + [[["ก", "ข"], ["ค", "ง"]]])
    rng = random.Random(1234)
    for original, name in ((pdf, "fuzz.pdf"), (docx_data, "fuzz.docx")):
        for trial in range(12):
            data = bytearray(original)
            if trial % 3 == 0:
                data = data[: rng.randrange(len(data) // 4, len(data))]  # truncated
            for _ in range(rng.randrange(1, 40)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            started = time.process_time()
            try:
                result = extract(bytes(data), name)
                assert isinstance(result, ExtractedDocument)
            except E.DocumentError:
                pass
            assert time.process_time() - started < 60, f"{name} trial {trial} too slow"


# ====================================================================== Thai PDF cleanup (synthetic)

def test_private_use_glyphs_map_back():
    # HarfBuzz's table: SD mai ek U+F70A, SL sara ii U+F702, SL sara uee + mai tho, RD yo ying
    assert clean_thai_pdf_text("ก\uf70aอน") == "ก่อน"
    assert clean_thai_pdf_text("ป\uf702") == "ปี"
    assert clean_thai_pdf_text("ฟ\uf704\uf714น") == "ฟื้น"
    assert clean_thai_pdf_text("ป\uf705า") == "ป่า"  # SDL mai ek
    assert clean_thai_pdf_text("\uf70fุ") == "ญุ"
    assert clean_thai_pdf_text("ก\uf88bอน") == "ก่อน"  # the Mac code point


def test_sara_am_written_as_nikhahit_and_sara_aa():
    assert clean_thai_pdf_text("จ\u0e4dานวน") == "จำนวน"
    assert clean_thai_pdf_text("น\u0e4d\u0e49า") == "น้ำ"  # the shaper's order: nikhahit, tone, aa
    assert clean_thai_pdf_text("น\u0e49\u0e4dา") == "น้ำ"


def test_marks_in_canonical_order():
    assert clean_thai_pdf_text("ก\u0e48\u0e35") == "กี่"  # tone mark before the vowel above
    assert clean_thai_pdf_text("ท\u0e49\u0e31ง") == "ทั้ง"
    assert clean_thai_pdf_text("ที\u0e48\u0e48") == "ที่"  # drawn twice (fake bold)


def test_detached_marks_rejoin():
    assert clean_thai_pdf_text("ก ่อน") == "ก่อน"
    assert clean_thai_pdf_text("ท ำงาน") == "ทำงาน"
    assert clean_thai_pdf_text("เ ด็ก") == "เด็ก"
    assert clean_thai_pdf_text("ผู้ป\n่วย") == "ผู้ป่วย"
    # stray marks standing alone are glyph debris, not text
    assert clean_thai_pdf_text("ข้อความ\n ่ ้ ่\nต่อ") == "ข้อความ\nต่อ"


def test_spaces_inside_words_go_but_spaces_between_words_stay():
    assert clean_thai_pdf_text("ประ ชาชน") == "ประชาชน"
    assert clean_thai_pdf_text("ไป มา") == "ไป มา"
    assert clean_thai_pdf_text("ราคา 2.50 บาท") == "ราคา 2.50 บาท"


def test_spaces_extractors_add_around_punctuation_go():
    # pypdf adds a space where the font changes: Thai letters and Latin punctuation come
    # from different subsets of Sarabun
    assert clean_thai_pdf_text('" วันนี้กินข้าวหรือยัง " แม่ถาม') == '"วันนี้กินข้าวหรือยัง" แม่ถาม'
    assert clean_thai_pdf_text("เวลา 22.00 น . ถึง ( ประมาณ ) ตอบ : ได้") == "เวลา 22.00 น. ถึง (ประมาณ) ตอบ: ได้"
    assert clean_thai_pdf_text("\u201c สวัสดี \u201d") == "\u201cสวัสดี\u201d"


def test_latin_text_passes_through():
    # wrapped lines join with a space; a line ending a sentence may end a paragraph: kept
    text = ("The committee met on Monday to review the budget for the coming fiscal year and\n"
            "agreed to postpone the final vote until the next session, citing a need for more\n"
            "detailed figures from the regional offices before any decision could be taken.\n"
            "Members also discussed the timeline for the new procurement rules, which are\n"
            "expected to take effect in the spring.\n\nA second paragraph.")
    assert clean_thai_pdf_text(text) == (
        "The committee met on Monday to review the budget for the coming fiscal year and agreed to "
        "postpone the final vote until the next session, citing a need for more detailed figures "
        "from the regional offices before any decision could be taken.\nMembers also discussed the "
        "timeline for the new procurement rules, which are expected to take effect in the spring."
        "\n\nA second paragraph.")


def _wrap(paragraph: str, width: int) -> list[str]:
    return [paragraph[i:i + width] for i in range(0, len(paragraph), width)]


def test_broken_lines_rejoin_into_paragraphs():
    source = paragraphs(4, start=10)
    # every paragraph cut every 70 characters, wherever that falls (inside words too)
    text = "\n\n".join("\n".join(_wrap(p, 70)) for p in source)
    cleaned = clean_thai_pdf_text(text)
    assert cleaned.split("\n\n") == source


def test_line_broken_inside_a_word_at_a_short_line():
    assert clean_thai_pdf_text("ประชาชนทั่วไปให้ความร่วมมือกับเจ้าหน้าที่เป็นอย่างดียิ่งในการรณ\nรงค์ครั้งนี้") \
        == "ประชาชนทั่วไปให้ความร่วมมือกับเจ้าหน้าที่เป็นอย่างดียิ่งในการรณรงค์ครั้งนี้"


def test_repeated_headers_and_page_numbers_are_removed_page_aware():
    body = paragraphs(8, start=20)
    footers = ["- 1 -", "2", "หน้า 3 จาก 4", "4/4"]  # every style of page number
    pages = ["\n".join([f"รายงานประจำปี 2567 ฉบับที่ {n + 1}", "กรมอนามัย",  # numbers differ
                        body[2 * n], "", body[2 * n + 1], footers[n]]) for n in range(4)]
    cleaned = clean_thai_pdf_pages(pages)
    assert "รายงานประจำปี" not in cleaned and "กรมอนามัย" not in cleaned
    assert not re.search(r"^\s*(-\s*\d+\s*-|\d+|หน้า \d+ จาก \d+|\d+/\d+)\s*$", cleaned, re.M)
    assert no_space(cleaned) == no_space("".join(body))
    # the same with form feeds between pages
    assert clean_thai_pdf_text("\f".join(pages)) == cleaned


def test_a_line_on_one_page_only_is_not_furniture():
    pages = ["บทนำ\nเนื้อหาหน้าแรก", "เนื้อหาหน้าสอง\nสรุป", "เนื้อหาหน้าสาม\nภาคผนวก"]
    cleaned = clean_thai_pdf_pages(pages)
    for kept in ("บทนำ", "สรุป", "ภาคผนวก"):
        assert kept in cleaned


def test_without_pages_only_marked_page_numbers_go():
    text = "ย่อหน้าแรก\nหน้า 2\nย่อหน้าที่สอง\n- 3 -\nตัวเลข 42 ในข้อความ\n42"
    cleaned = clean_thai_pdf_text(text)
    assert "หน้า 2" not in cleaned and "- 3 -" not in cleaned and "ตัวเลข 42 ในข้อความ" in cleaned


def _damage(text: str, tone_to) -> str:
    """Skia's damage: a tone mark over a vowel above (a raised variant glyph) comes out
    as ``tone_to(tone)``; vowels above ป ฝ ฟ (shifted left) too."""
    text = re.sub(f"([\u0e34-\u0e37\u0e31])([{THAI_TONES}])", lambda m: m.group(1) + tone_to(m.group(2)), text)
    return re.sub("([ปฝฟ])([\u0e34-\u0e37])", lambda m: m.group(1) + tone_to(m.group(2)), text)


def test_unknown_glyphs_without_identity_are_guessed_from_the_dictionary():
    source = "\n".join(paragraphs(6, start=40))
    damaged = _damage(source, lambda _: "\x00")
    assert damaged.count("\x00") > 30
    cleaned = clean_thai_pdf_text(damaged)
    assert "\x00" not in cleaned
    assert similarity(source, cleaned) >= 0.99 and thai_recovered(source, cleaned) >= 0.99


def test_unknown_glyphs_with_identity_are_decided_once_per_glyph():
    source = "\n".join(paragraphs(6, start=40))
    ids: dict[str, str] = {}
    damaged = _damage(source, lambda mark: ids.setdefault(mark, glyph_placeholder(len(ids))))
    cleaned = resolve_unknown_glyphs(repair_characters(damaged))
    assert no_space(cleaned) == no_space(source)
    # pdfminer's (cid:N) is an identity too
    as_cid = re.sub("[\U00100000-\U0010fffd]", lambda m: f"(cid:{ord(m.group(0)) - 0x100000 + 70})", damaged)
    assert no_space(clean_thai_pdf_text(as_cid)) == no_space(source)


def test_thousands_of_unknown_glyphs_cost_bounded_time(monkeypatch):
    from api.documents import thai_pdf

    monkeypatch.setattr(thai_pdf, "_MAX_SCORED_SLOTS", 300)
    text = "".join(paragraphs(20))
    hostile = "".join(c + (glyph_placeholder(i % 40000) if "ก" <= c <= "ฮ" else "")
                      for i, c in enumerate(text))  # a new glyph after every consonant
    nuls = "".join(c + ("\x00" if "ก" <= c <= "ฮ" else "") for c in text)
    for damaged in (hostile, nuls):
        started = time.process_time()
        cleaned = clean_thai_pdf_text(damaged)
        assert time.process_time() - started < 20
        assert not re.search("[\x00\U00100000-\U0010fffd]", cleaned)


def test_unknown_glyphs_outside_thai_words_are_dropped():
    assert clean_thai_pdf_text("Total\x00 \ufffd 42") == "Total 42"


def test_clean_text_is_idempotent_on_clean_thai():
    source = "\n\n".join(paragraphs(5, start=60))
    assert clean_thai_pdf_text(source) == source


# ====================================================================== chunking

def char_counter(chars_per_token: int = 4):
    calls = {"chars": 0, "calls": 0}

    def count(text: str) -> int:
        calls["chars"] += len(text)
        calls["calls"] += 1
        return len(text) // chars_per_token + 1

    return count, calls


def assert_lossless(text: str, pieces: list[str]) -> None:
    assert no_space("".join(pieces)) == no_space(text)
    position = 0
    for piece in pieces:  # each piece is the text's next stretch, stripped at the cuts
        found = text.find(piece, position)
        assert found >= 0 and not text[position:found].strip()
        position = found + len(piece)
    assert not text[position:].strip()


def test_split_small_text_and_blank_text():
    count, _ = char_counter()
    assert split_text("  สั้น ๆ  ", 100, count) == ["สั้น ๆ"]
    assert split_text(" \n\t", 100, count) == []
    with pytest.raises(ValueError):
        split_text("x", 0, count)


@pytest.mark.parametrize("budget", [16, 64, 300, 1024])
def test_split_pieces_fit_and_lose_nothing(budget):
    text = "\n".join(paragraphs(80))
    count, _ = char_counter()
    pieces = split_text(text, budget, count)
    assert len(pieces) > 1
    assert all(count(piece) <= budget for piece in pieces)
    assert_lossless(text, pieces)


def test_split_prefers_paragraph_breaks():
    paras = paragraphs(40)
    text = "\n\n".join(paras)
    count, _ = char_counter()
    pieces = split_text(text, 400, count)
    for piece in pieces:  # whole paragraphs only: each fits the budget on its own
        for part in piece.split("\n\n"):
            assert part in paras


def test_split_one_long_line_on_thai_sentence_boundaries():
    from pythainlp.tokenize import sent_tokenize

    text = " ".join(paragraphs(30))
    sentence_ends = set()
    position = 0
    for sentence in sent_tokenize(text, engine="crfcut"):
        position += len(sentence)
        sentence_ends.add(len(text[:position].rstrip()))
    count, _ = char_counter()
    pieces = split_text(text, 200, count)
    assert_lossless(text, pieces)
    position = 0
    for piece in pieces[:-1]:
        position = text.find(piece, position) + len(piece)
        assert position in sentence_ends, piece[-40:]


def test_split_never_cuts_inside_a_thai_word():
    from pythainlp.tokenize import word_tokenize

    text = no_space("".join(paragraphs(10)))  # no spaces, no sentences the CRF can find
    bounds, position = set(), 0
    for word in word_tokenize(text, engine="newmm"):
        position += len(word)
        bounds.add(position)
    count, _ = char_counter()
    pieces = split_text(text, 30, count)
    assert "".join(pieces) == text
    position = 0
    for piece in pieces:
        position += len(piece)
        assert position in bounds


def test_split_a_word_longer_than_the_budget_between_grapheme_clusters():
    import grapheme

    blob = "e\u0301" * 3000 + " " + "ก่ำ" * 10  # é as e + combining acute: one cluster
    count, _ = char_counter(1)
    pieces = split_text(blob, 101, count)
    assert all(count(p) <= 101 for p in pieces) and no_space("".join(pieces)) == no_space(blob)
    for piece in pieces:  # every piece starts and ends on a whole cluster
        clusters = list(grapheme.graphemes(piece))
        assert not unicodedata.category(piece[0]).startswith("M")
        assert clusters[-1] in ("e\u0301", "ก่ำ")


def _timed(text: str, budget: int, count) -> tuple[list[str], float]:
    """The pieces and the CPU seconds this process spent on them (not the wall clock)."""
    started = time.process_time()
    pieces = split_text(text, budget, count)
    return pieces, time.process_time() - started


def _text_200k(one_line: bool) -> str:
    text = (REPO / "assets" / "thai_corpus.txt").read_text(encoding="utf-8")
    text = (text * (200_000 // len(text) + 1))[:200_000]
    return re.sub(r"\s+", " ", text) if one_line else text


@pytest.mark.parametrize("one_line", [False, True])
def test_split_200k_characters_with_a_cheap_counter_is_linear(one_line):
    text = _text_200k(one_line)
    count, calls = char_counter()
    pieces, seconds = _timed(text, 512, count)
    print(f"\nsplit 200k chars ({'one line' if one_line else 'lines'}), cheap counter: "
          f"{seconds:.2f}s, {len(pieces)} pieces, counted {calls['chars'] / len(text):.2f}x the text")
    assert all(count(p) <= 512 for p in pieces)
    assert_lossless(text, pieces)
    assert calls["chars"] <= 6 * len(text)  # each part once, each piece once more, the whole once
    assert seconds < (60 if one_line else 5)


def test_split_200k_characters_with_the_demo_tokenizer(demo_checkpoint):
    from transformers import AutoTokenizer

    base, _ = demo_checkpoint
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    counted = {"chars": 0}

    def count(text: str) -> int:
        counted["chars"] += len(text)
        return len(tokenizer.encode(text, add_special_tokens=False))

    for one_line in (False, True):
        text = _text_200k(one_line)
        counted["chars"] = 0
        pieces, seconds = _timed(text, 1024, count)
        print(f"\nsplit 200k chars ({'one line' if one_line else 'lines'}), demo tokenizer: "
              f"{seconds:.2f}s, {len(pieces)} pieces, counted {counted['chars'] / len(text):.2f}x")
        assert all(count(p) <= 1024 for p in pieces)
        assert_lossless(text, pieces)
        assert counted["chars"] <= 6 * len(text)
        assert seconds < (90 if one_line else 30)
