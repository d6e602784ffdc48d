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


def test_exactly_the_guards_public_api_is_published(ui_client):
    from thai_ui.guard import PUBLIC_API

    endpoints = ui_client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {f"/{name}" for name in PUBLIC_API}
    parameters = [p["parameter_name"] for p in endpoints["/summarize_file"]["parameters"]]
    assert parameters == ["path", "max_tokens", "temperature"]  # one model served: no pick


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
    # A text longer than the context window is summarized in chunks now (below); one
    # longer than any request may be is still refused.
    with pytest.raises(AppError) as too_long:
        ui_client.predict("ข่าว " * 40_001, 32, 0.7, api_name="/summarize")
    assert "ยาวเกิน" in str(too_long.value) and "200,000 characters" in str(too_long.value)


def test_ui_page_headers_by_default_allow_only_self_framing(live_server):
    page = httpx.get(live_server.url + "/ui/")
    assert page.status_code == 200
    assert "frame-ancestors 'self'" == page.headers["content-security-policy"].split("; ")[-1]
    assert "x-frame-options" not in page.headers
    redirect = httpx.get(live_server.url + "/", headers={"Accept": "text/html"})
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/ui/")


def test_a_text_longer_than_the_context_is_summarized_in_chunks_with_progress(ui_client):
    text = "ข่าววันนี้ฝนตกหนักในกรุงเทพมหานคร น้ำท่วมขังหลายพื้นที่\n" * 600  # ~35,000 chars
    updates = stream_outputs(ui_client.submit(text, 24, 0.0, api_name="/summarize"))
    lines = [line for _, line in updates]
    progress = [line for line in lines if line.startswith(("ข้อความยาว", "รวมสรุป"))]
    assert any("ส่วนที่" in line and "chunk" in line and "round 1" in line for line in progress)
    summary, final = updates[-1]
    assert summary and final.startswith("เสร็จ / done") and "chunks in" in final


def test_summarize_file_summarizes_an_uploaded_document(ui_client, tmp_path):
    from gradio_client import handle_file

    from tests.documents_support import docx_bytes

    text = (REPO / "assets" / "examples" / "news.txt").read_text(encoding="utf-8")
    path = tmp_path / "ข่าว.docx"
    path.write_bytes(docx_bytes(text))
    job = ui_client.submit(handle_file(str(path)), 16, 0.0, api_name="/summarize_file")
    updates = stream_outputs(job)
    summary, final = updates[-1]
    assert summary and final.startswith("เสร็จ / done") and "ข่าว.docx" in final and "DOCX" in final
    assert len(updates) >= 2, "the summary streams"
    with pytest.raises(AppError) as wrong:
        bad = tmp_path / "tool.exe"
        bad.write_bytes(b"MZ" + bytes(range(256)))
        ui_client.predict(handle_file(str(bad)), 16, 0.0, api_name="/summarize_file")
    assert "ไม่รองรับ" in str(wrong.value) and "not supported" in str(wrong.value)
