"""A 3-piece text in a real headless browser (Debian's chromium via Playwright): the line
under the summary shows the pieces done of 3 and the tokens written while the pieces are
generated, before any summary text, on the shared live server (pieces of 1024 tokens)."""

from __future__ import annotations

import pytest

from api.serving.summarize import PROGRESS_EVERY_TOKENS
from tests.support import (
    GRADIO_TAP_JS,
    WATCH_JS,
    as_textarea_shows,
    completed_event,
    streamed_updates,
)
from tests.test_summarize_long import thai_text
from tests.test_summarize_progress import three_piece_chars


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="th-TH")
    context.add_init_script(GRADIO_TAP_JS)
    page = context.new_page()
    yield page
    context.close()


def test_a_three_piece_text_shows_its_pieces_and_tokens_before_the_summary(live_server, page):
    text = thai_text(three_piece_chars(live_server.url))
    page.goto(live_server.url + "/ui/")
    page.wait_for_selector('#model-status [data-state="ready"]', timeout=30_000)
    page.locator("#thai-input textarea").fill(text)
    page.get_by_role("radio", name="สั้น / short").check()  # 64 tokens, as three_piece_chars
    page.evaluate(WATCH_JS, ["__usage", "document.querySelector('#summary-usage').innerText"])
    page.click("#summarize-btn")
    page.locator("#summary-usage").filter(has_text="จาก 3").filter(has_text="of 3 chunks done") \
        .wait_for(timeout=120_000)
    page.locator("#summary-usage").filter(has_text="เสร็จ / done").wait_for(timeout=300_000)
    summary = page.locator("#thai-summary textarea").input_value()
    assert summary
    shown = page.evaluate("window.__usage")
    first_pieces = next(i for i, u in enumerate(shown) if "of 3 chunks done" in u)
    assert "tokens written" in shown[first_pieces] and "จาก 3" in shown[first_pieces]
    assert first_pieces < next(i for i, u in enumerate(shown) if u.startswith("เสร็จ / done"))
    # what the page's event stream carried: before any summary text, the round's pieces
    # done of 3 in order (each piece's end is reported), and the tokens written never back
    event = completed_event(page, lambda output: as_textarea_shows(output[0]) == summary)
    updates = streamed_updates(event)
    first_text = next(i for i, (out, _) in enumerate(updates) if out)
    lines = [line for _, line in updates[:first_text] if "of 3 chunks done" in line]
    done = [int(line.split("ส่วนที่เสร็จ ")[1].split(" ")[0]) for line in lines]
    assert done == sorted(done) and set(done) - {0} == {1, 2, 3}, lines
    written = [int(line.split("เขียนแล้ว ")[1].split(" ")[0].replace(",", "")) for line in lines]
    assert written == sorted(written), lines
    # The count moves while no piece is done yet (a report every PROGRESS_EVERY_TOKENS) unless
    # the first piece to end did so before that many were written: the demo model's random
    # weights may end a piece after a few tokens. The first line with a piece done is the one
    # its end sent, so it tells how many had been written by then.
    written_at_first_end = next(w for w, d in zip(written, done) if d > 0)
    if written_at_first_end >= PROGRESS_EVERY_TOKENS:
        assert any(d == 0 and w > 0 for w, d in zip(written, done)), lines
