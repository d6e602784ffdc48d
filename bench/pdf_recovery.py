"""How much Thai text survives a PDF: extraction before and after cleanup.

Makes a PDF the way people make them (headless Chromium printing Thai HTML set in the
bundled Sarabun font, with a running header and page numbers), or takes one of yours with
its source text, and reports for each extractor: characters extracted against the source,
similarity to the source (difflib ratio, whitespace removed) and the share of the source's
Thai characters recovered (multiset of U+0E00-U+0E7F), raw and after
``api.documents`` cleanup.

    python -m bench.pdf_recovery                       # 40 paragraphs of assets/thai_corpus.txt
    python -m bench.pdf_recovery --paragraphs 270      # the whole corpus (~23 pages)
    python -m bench.pdf_recovery --pdf file.pdf --source file.txt --json out.json

Rows: ``pypdf`` raw text; ``pypdf+clean``: that text through clean_thai_pdf_pages (unknown
glyphs guessed one by one); ``pypdf+glyphs+clean``: api.documents.extract_document, which
also gives every unmapped glyph a placeholder so each is decided once for the document;
``pdfplumber`` and ``pdfplumber+clean`` when pdfplumber is installed (it is not a
requirement of the server).
"""

from __future__ import annotations

import argparse
import difflib
import html
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FONTS = REPO / "assets" / "fonts"
CORPUS = REPO / "assets" / "thai_corpus.txt"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HEADER = "รายงานสรุปข่าวประจำสัปดาห์"


def corpus_paragraphs(count: int, start: int = 0) -> list[str]:
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").split("\n") if line.strip()]
    return lines[start:start + count]


def thai_html(paragraphs: list[str], *, header: str | None = HEADER, page_numbers: bool = True,
              font_size_pt: float = 14) -> str:
    """An HTML page of the paragraphs in Sarabun, with a running header and "หน้า N" footers
    drawn in page margin boxes (in Sarabun too, so they extract like the text)."""
    margin_boxes = ""
    if header:
        margin_boxes += (f'@top-center {{ content: "{header}"; font-family: Sarabun; '
                         "font-size: 10pt; }\n")
    if page_numbers:
        margin_boxes += ('@bottom-right { content: "หน้า " counter(page); font-family: Sarabun; '
                         "font-size: 10pt; }\n")
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    return f"""<!doctype html>
<html lang="th"><head><meta charset="utf-8"><base href="{FONTS.as_uri()}/">
<link rel="stylesheet" href="fonts.css">
<style>
@page {{ size: A4; margin: 2.5cm 2cm;
{margin_boxes}}}
body {{ font-family: Sarabun; font-size: {font_size_pt}pt; line-height: 1.6; }}
</style></head><body>{body}</body></html>"""


def launch_chromium(playwright, executable: str | None = None):
    executable = executable or shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        raise RuntimeError("chromium is not installed")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


def print_pdf(browser, page_html: str, out: Path, *, web_fonts: bool = True) -> Path:
    """``page_html`` printed to ``out`` by the browser once the web fonts have loaded
    (``web_fonts``: it uses them, and a page that could not load them is an error)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "page.html"
        source.write_text(page_html, encoding="utf-8")
        page = browser.new_page()
        try:
            page.goto(source.as_uri())
            page.evaluate("document.fonts.ready.then(() => document.fonts.size)")
            loaded = page.evaluate("[...document.fonts].filter(f => f.status === 'loaded').length")
            if web_fonts and not loaded:
                raise RuntimeError("the Sarabun web font did not load")
            page.pdf(path=str(out), prefer_css_page_size=True)
        finally:
            page.close()
    return out


def make_thai_pdf(paragraphs: list[str], out: Path, **html_options) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            return print_pdf(browser, thai_html(paragraphs, **html_options), out)
        finally:
            browser.close()


# ----------------------------------------------------------------------------- measures

def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def thai_characters(text: str) -> Counter:
    return Counter(c for c in text if "\u0e00" <= c <= "\u0e7f")


def similarity(source: str, extracted: str) -> float:
    return difflib.SequenceMatcher(None, _no_space(source), _no_space(extracted), autojunk=False).ratio()


def thai_recovered(source: str, extracted: str) -> float:
    """Share of the source's Thai characters found in the extraction (as multisets)."""
    want, got = thai_characters(source), thai_characters(extracted)
    total = sum(want.values())
    return sum((want & got).values()) / total if total else 1.0


def measure(source: str, extracted: str) -> dict:
    return {"characters": len(_no_space(extracted)), "source_characters": len(_no_space(source)),
            "similarity": round(similarity(source, extracted), 4),
            "thai_recovered": round(thai_recovered(source, extracted), 4)}


# ----------------------------------------------------------------------------- extractors

def pypdf_pages(path: Path) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() or "" for page in PdfReader(str(path)).pages]


def pdfplumber_pages(path: Path) -> list[str] | None:
    try:
        import pdfplumber
    except ImportError:
        return None
    with pdfplumber.open(str(path)) as pdf:
        return [page.extract_text() or "" for page in pdf.pages]


def compare(path: Path, source: str) -> dict:
    from api.documents.extract import extract_document
    from api.documents.thai_pdf import clean_thai_pdf_pages

    rows: list[dict] = []

    def add(name: str, get) -> None:
        started = time.perf_counter()
        text = get()
        seconds = round(time.perf_counter() - started, 2)  # extraction only, not the measures
        if text is not None:
            rows.append({"extractor": name, **measure(source, text), "seconds": seconds})

    data = path.read_bytes()
    add("pypdf", lambda: "\n".join(pypdf_pages(path)))
    add("pypdf+clean", lambda: clean_thai_pdf_pages(pypdf_pages(path)))
    add("pypdf+glyphs+clean", lambda: extract_document(
        data, path.name, max_bytes=len(data) + 1, max_pages=100000).text)
    plumber = pdfplumber_pages(path)
    if plumber is not None:
        add("pdfplumber", lambda: "\n".join(pdfplumber_pages(path)))
        add("pdfplumber+clean", lambda: clean_thai_pdf_pages(pdfplumber_pages(path)))
    return {"pdf": str(path), "bytes": len(data), "rows": rows}


def table(result: dict) -> str:
    head = ("| extractor | characters / source | similarity | Thai chars recovered | seconds |\n"
            "| --- | --- | --- | --- | --- |")
    lines = [head] + [
        f"| {r['extractor']} | {r['characters']} / {r['source_characters']} | {r['similarity']:.4f} "
        f"| {r['thai_recovered']:.4f} | {r['seconds']} |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, help="a PDF to measure (with --source)")
    parser.add_argument("--source", type=Path, help="the text the PDF was made from")
    parser.add_argument("--paragraphs", type=int, default=40,
                        help="paragraphs of assets/thai_corpus.txt in the generated PDF")
    parser.add_argument("--keep", type=Path, help="where to keep the generated PDF")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    if args.pdf:
        if not args.source:
            parser.error("--pdf needs --source")
        path, source = args.pdf, args.source.read_text(encoding="utf-8")
        result = compare(path, source)
    else:
        paragraphs = corpus_paragraphs(args.paragraphs)
        source = "\n".join(paragraphs)
        with tempfile.TemporaryDirectory() as tmp:
            path = args.keep or Path(tmp) / "thai.pdf"
            make_thai_pdf(paragraphs, path)
            result = compare(path, source)
        result["paragraphs"] = len(paragraphs)
    out = json.dumps(result, ensure_ascii=False, indent=2)
    print(out)
    print()
    print(table(result))
    if args.json:
        args.json.write_text(out + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
