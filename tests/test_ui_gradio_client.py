"""The UI's Gradio endpoints, driven by ``gradio_client`` against a real server
(the generated checkpoint, its LoRA adapter, the real engine)."""

from __future__ import annotations

import re

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.support import REPO


@pytest.fixture(scope="module")
def ui_client(live_server) -> Client:
    return Client(live_server.url + "/ui/", verbose=False, download_files=False)


def stream_outputs(job) -> list:
    """Every update the server streamed, in order (the job iterator yields each one)."""
    return list(job)


def test_both_endpoints_are_published(ui_client):
    endpoints = ui_client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/summarize", "/chat"} <= set(endpoints)


def test_summarize_streams_the_summary_and_reports_usage(ui_client):
    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8")
    job = ui_client.submit(text, 24, 0.0, api_name="/summarize")
    updates = stream_outputs(job)
    assert len(updates) >= 2, "the summary should arrive in several parts"
    summaries = [summary for summary, _ in updates]
    assert summaries[-1] and all(len(a) <= len(b) for a, b in zip(summaries, summaries[1:]))
    final_usage = updates[-1][1]
    assert final_usage.startswith("เสร็จ / done") and "วินาที / s" in final_usage
    completion_tokens = int(re.search(r"\+ (\d+) =", final_usage).group(1))
    assert 1 <= completion_tokens <= 24
    assert ("length limit" in final_usage) == (completion_tokens == 24)  # else EOS came first
    assert job.outputs()[-1] == updates[-1]


def test_chat_streams_in_parts(ui_client):
    job = ui_client.submit("สวัสดีครับ ช่วยแนะนำอาหารไทย", "ตอบสั้น ๆ", 16, 0.7, api_name="/chat")
    parts = stream_outputs(job)
    assert len(parts) >= 2, "the reply should stream in several parts"
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "each part extends the last"
    assert texts[-1]


def test_errors_are_shown_in_thai_and_english(ui_client):
    with pytest.raises(AppError) as empty:
        ui_client.predict("  \n ", 32, 0.7, api_name="/summarize")
    assert "กรุณาวางข้อความภาษาไทย" in str(empty.value) and "Please paste" in str(empty.value)
    with pytest.raises(AppError) as too_long:
        ui_client.predict("ข่าว " * 6000, 32, 0.7, api_name="/summarize")
    assert "ยาวเกิน" in str(too_long.value) and "context" in str(too_long.value)


def test_ui_page_headers_by_default_allow_only_self_framing(live_server):
    page = httpx.get(live_server.url + "/ui/")
    assert page.status_code == 200
    assert "frame-ancestors 'self'" == page.headers["content-security-policy"].split("; ")[-1]
    assert "x-frame-options" not in page.headers
    redirect = httpx.get(live_server.url + "/", headers={"Accept": "text/html"})
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/ui/")
