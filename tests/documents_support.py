"""Documents for tests, made the way analysts' files are made: Word files with python-docx,
PDFs printed by a real browser (Debian's chromium through Playwright, the Sarabun font
embedded), HTML and Markdown pages.
"""

from __future__ import annotations

import base64
import html
import io
from functools import lru_cache

from tests.support import REPO, chromium_browser

FONT = REPO / "assets" / "fonts" / "sarabun-thai-400.woff2"


def paragraphs(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def sarabun_ttf() -> bytes:
    """The bundled Sarabun (Thai) as TrueType: from a WOFF2 web font, Chromium's PDFs map
    every glyph to U+0000 (no text layer at all); from TrueType, only the positional
    variants of marks, as real Chromium PDFs of Thai documents do."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(FONT))
    font.flavor = None
    out = io.BytesIO()
    font.save(out)
    return out.getvalue()


def html_page(text: str, title: str = "รายงาน", *, embed_font: bool = False) -> str:
    """A whole HTML page of ``text``, one paragraph per line (Sarabun embedded for print)."""
    style = "body { font-family: Sarabun, sans-serif; font-size: 14px; line-height: 1.6; }"
    if embed_font:
        font = base64.b64encode(sarabun_ttf()).decode()
        style = (f"@font-face {{ font-family: Sarabun; src: url(data:font/ttf;base64,{font}) "
                 f"format('truetype'); }} {style}")
    body = "\n".join(f"<p>{html.escape(p)}</p>" for p in paragraphs(text))
    return (f"<!doctype html><html lang=\"th\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body><h1>{title}</h1>\n{body}\n"
            "<script>var ignored = 'not text';</script></body></html>")


def html_bytes(text: str) -> bytes:
    return html_page(text).encode("utf-8")


def markdown_bytes(text: str) -> bytes:
    parts = ["# รายงาน", ""]
    for i, paragraph in enumerate(paragraphs(text)):
        if i and i % 5 == 0:
            parts += [f"## ส่วนที่ {i // 5}", ""]
        parts += [paragraph, ""]
    return "\n".join(parts).encode("utf-8")


def docx_bytes(text: str) -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("รายงาน", level=1)
    for paragraph in paragraphs(text):
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def pdf_bytes(text: str) -> bytes:
    """``text`` printed to A4 pages by headless Chromium (skips without chromium)."""
    with chromium_browser() as browser:
        page = browser.new_page()
        page.set_content(html_page(text, embed_font=True), wait_until="load")
        page.evaluate("document.fonts.ready")
        return page.pdf(format="A4", margin={"top": "2cm", "bottom": "2cm",
                                             "left": "2cm", "right": "2cm"})
