"""The UI in a real headless browser (Debian's chromium via Playwright).

A person's path: open /ui/, paste Thai text, summarize (the summary streams
in), chat (the reply streams in). Also: nothing is fetched from any host but
the server, Thai glyphs are drawn with the bundled Sarabun font (asked of the
browser's renderer through the DevTools protocol), and the frame policy lets
an allowed parent origin embed the UI while another origin is refused.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tests.support import (
    ARTIFACTS,
    GRADIO_TAP_JS,
    REPO,
    WATCH_JS,
    as_textarea_shows,
    completed_event,
    completed_output,
    free_port,
    start_server,
    streamed_values,
)
from thai_ui.text_stats import count_graphemes, count_words


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="th-TH")
    context.add_init_script(GRADIO_TAP_JS)
    page = context.new_page()
    page.requested_urls = []
    context.on("request", lambda request: page.requested_urls.append(request.url))
    yield page
    context.close()


def assistant_text(message: dict) -> str:
    """A chat message's text (Gradio's messages carry a string or a list of text parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def rendered_fonts(page, selector: str) -> dict[str, int]:
    """Family -> glyph count of the fonts the renderer really used for the node's text."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    assert node, f"{selector} not found"
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cdp.detach()
    return {font["familyName"]: font["glyphCount"] for font in fonts}


def test_summarize_and_chat_in_the_browser(live_server, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(live_server.url + "/ui/")
    page.wait_for_selector('#model-status [data-state="ready"]', timeout=30_000)
    assert "thai-qwen-lora" in page.inner_text("#model-status")

    # paste the example news text; the counts under the box are Thai-aware
    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8").strip()
    page.locator("#thai-input textarea").fill(text)
    graphemes, words = count_graphemes(text), count_words(text)
    stats = page.locator("#text-stats")
    stats.filter(has_text=f"characters: {graphemes:,}").wait_for(timeout=20_000)
    assert f"words: {words:,}" in stats.inner_text()
    assert graphemes < len(text), "Thai marks are not counted as characters"
    stats.filter(has_text="tokens: ").filter(has_text=" / ").wait_for(timeout=20_000)

    # summarize: watch the output box while it streams
    page.get_by_role("radio", name="สั้น / short").check()
    page.evaluate(WATCH_JS, ["__summary", "document.querySelector('#thai-summary textarea').value"])
    page.click("#summarize-btn")
    page.locator("#summary-usage").filter(has_text="เสร็จ / done").wait_for(timeout=60_000)
    seen = page.evaluate("window.__summary")
    summary = page.locator("#thai-summary textarea").input_value()
    assert summary and seen[-1] == summary
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    # the page's event stream brought the summary in parts, each extending the last (how
    # many of them a busy browser painted in between is its own business)
    event = completed_event(page, lambda output: as_textarea_shows(output[0]) == summary)
    parts = [v for v in streamed_values(event, 0) if v]
    assert len(parts) >= 2, f"the summary should stream in parts, got {len(parts)}"
    assert all(later.startswith(earlier) for earlier, later in zip(parts, parts[1:]))
    assert summary.startswith(as_textarea_shows(parts[-1]))
    usage = page.inner_text("#summary-usage")
    assert "tokens:" in usage and "วินาที / s" in usage
    page.screenshot(path=str(ARTIFACTS / "ui-summarize.png"), full_page=True)

    # Thai text is drawn with the bundled Sarabun, not a system font
    assert page.evaluate("document.fonts.check('16px Sarabun', 'ภาษาไทย')")
    for selector in ("#text-stats p", "#model-status .banner", "h1"):
        fonts = rendered_fonts(page, selector)
        assert set(fonts) == {"Sarabun"}, f"{selector} drawn with {fonts}"

    # chat: the reply streams into the last bot message
    page.get_by_role("tab", name="สนทนา / Chat").click()
    page.evaluate(WATCH_JS, ["__reply", "(() => { const m = document.querySelectorAll("
                                        "'#thai-chat [data-testid=\"bot\"]'); "
                                        "return m.length ? m[m.length - 1].innerText : ''; })()"])
    box = page.locator("#chat-input textarea")
    box.fill("สวัสดีครับ ช่วยแนะนำอาหารไทยหน่อย")
    box.press("Enter")
    page.locator('#thai-chat [data-testid="user"]').filter(has_text="ช่วยแนะนำอาหารไทย").wait_for()
    page.wait_for_function("document.querySelector('#chat-input textarea') && "
                           "!document.querySelector('#chat-input textarea').disabled && "
                           "window.__reply.length > 0", timeout=60_000)
    # painted as Markdown, so a later paint need not extend an earlier one ("*a" becomes "a"
    # once the model closes the emphasis); the order of the text is read from the event stream
    assert page.evaluate("window.__reply")[-1]
    chat = completed_event(page, lambda output: isinstance(output[-1], list) and any(
        "ช่วยแนะนำอาหารไทย" in json.dumps(turn, ensure_ascii=False) for turn in output[-1]))
    history = completed_output(chat)[-1]
    assert history[-1]["role"] == "assistant"
    reply = assistant_text(history[-1])
    parts = [assistant_text(h[-1]) for h in streamed_values(chat, len(completed_output(chat)) - 1)
             if h and h[-1]["role"] == "assistant"]
    parts = [p for p in parts if p]
    assert len(parts) >= 2, f"the reply should stream in parts, got {len(parts)}"
    assert all(later.startswith(earlier) for earlier, later in zip(parts, parts[1:]))
    assert reply.startswith(parts[-1])
    assert set(rendered_fonts(page, '#thai-chat [data-testid="user"] p')) == {"Sarabun"}
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)

    server_host = urlsplit(live_server.url).netloc
    other_hosts = {urlsplit(u).netloc for u in page.requested_urls
                   if urlsplit(u).scheme in ("http", "https", "ws", "wss")} - {server_host}
    assert not other_hosts, f"the page fetched from other hosts: {other_hosts}"
    assert any(u.endswith("/ui/fonts/sarabun-thai-400.woff2") for u in page.requested_urls)


class _ParentPage(BaseHTTPRequestHandler):
    """Serves one page that embeds ``self.server.child`` in an iframe."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = (f'<!doctype html><html><head><meta charset="utf-8"><title>parent</title></head>'
                f'<body><h1>parent site</h1><iframe id="thai" src="{self.server.child}" '
                f'allow="clipboard-write" width="1200" height="900"></iframe></body></html>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def parent_sites():
    """Two parent sites on other loopback ports: other origins than the app's."""
    servers = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", free_port()), _ParentPage)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_iframe_embedding_follows_the_frame_ancestors_setting(model_env, parent_sites, browser,
                                                              tmp_path):
    allowed, refused = parent_sites
    allowed_origin = f"http://127.0.0.1:{allowed.server_port}"
    # (Serving under a sub-path through a proxy is tested with real nginx in
    # tests/test_deploy_nginx_e2e.py.)
    server = start_server({**model_env, "THAI_FRAME_ANCESTORS": allowed_origin}, tmp_path)
    try:
        for site in parent_sites:
            site.child = server.url + "/ui/"
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        urls, console = [], []
        context.on("request", lambda request: urls.append(request.url))
        page.on("console", lambda message: console.append(message.text))

        page.goto(allowed_origin + "/")
        frame = page.frame_locator("#thai")
        frame.locator("#thai-input textarea").wait_for(timeout=30_000)
        frame.locator('#model-status [data-state="ready"]').wait_for(timeout=30_000)  # polled
        assert frame.locator("h1").inner_text().startswith("สรุปความ")
        child = next(f for f in page.frames if f.url.startswith(server.url))
        assert child.evaluate("document.fonts.check('16px Sarabun', 'ภาษาไทย')")
        assert any(u == server.url + "/ui/fonts/sarabun-thai-400.woff2" for u in urls)
        page.screenshot(path=str(ARTIFACTS / "ui-iframe-allowed.png"))

        page.goto(f"http://127.0.0.1:{refused.server_port}/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("frame-ancestors" in m for m in console):
            page.wait_for_timeout(100)
        assert any("frame-ancestors" in m for m in console), console
        frames = [f for f in page.frames if f is not page.main_frame]
        assert frames and all(not f.url.startswith(server.url) or not f.query_selector("#thai-input")
                              for f in frames)
        page.screenshot(path=str(ARTIFACTS / "ui-iframe-refused.png"))
        context.close()
    finally:
        server.stop()
