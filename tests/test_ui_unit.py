"""The UI's pieces without a browser: Thai counts, history normalisation, the
frame policy, the status banner and the handlers over the fake engine, and the
mounted app answered through FastAPI's test client."""

from __future__ import annotations

import re

import asyncio
import logging

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from api.engine import EngineState
from api.server import create_app
from api.serving import Serving
from api.settings import ModelSettings, Settings
from tests.fakes import FakeEngine
from thai_ui.chat_history import build_messages, content_text, normalize_history
from thai_ui.frame_policy import frame_ancestors_value, merge_csp
from thai_ui.handlers import UIHandlers
from thai_ui.spaces_hardware import warn_if_zero_gpu
from thai_ui.status import status_html
from thai_ui.text_stats import TextStats, count_graphemes, count_words


# ------------------------------------------------------------------ Thai counts
@pytest.mark.parametrize("text, graphemes", [
    ("กี่", 1),            # consonant + vowel + tone mark: one character to a reader
    ("น้ำ", 1),            # tone mark + SARA AM (a spacing mark) stay with the consonant
    ("ผู้ใหญ่", 4),
    ("ฉันรักภาษาไทย", 11),
    ("", 0),
])
def test_graphemes_are_what_a_thai_reader_counts(text, graphemes):
    assert count_graphemes(text) == graphemes
    assert count_graphemes(text) <= len(text)


def test_words_come_from_the_thai_tokenizer_not_spaces():
    assert count_words("ฉันรักภาษาไทย") == 3  # no spaces, three words
    assert "ฉันรักภาษาไทย".split() == ["ฉันรักภาษาไทย"]
    # numbers and Latin words count, punctuation and spaces do not
    assert count_words("ฉันรักภาษาไทย 123 Hello, world!") == 6
    assert count_words("  \n ") == 0


def test_stats_line_shows_the_token_limit_and_warns_when_over_it():
    fits = TextStats(graphemes=1234, words=300, tokens=900, token_limit=3946).markdown()
    assert "1,234" in fits and "300" in fits and "900" in fits and "3,946" in fits
    assert "too long" not in fits
    over = TextStats(graphemes=10, words=2, tokens=5000, token_limit=3946)
    assert over.over_limit and "ยาวเกินไป / too long" in over.markdown()
    loading = TextStats(graphemes=10, words=2, tokens=None, token_limit=None).markdown()
    assert "model loading" in loading


# -------------------------------------------------------------- chat history
def test_gradio6_history_with_text_parts_and_files_becomes_plain_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "สวัสดี"}]},
        {"role": "assistant", "content": "สวัสดีครับ"},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}},
                                     {"type": "text", "text": "ภาพนี้"}]},
        {"role": "user", "content": {"path": "/tmp/only-a-file.pdf"}},  # nothing to read
        {"role": "assistant", "content": "คิดอยู่", "metadata": {"title": "thinking"}},
        {"role": "assistant", "content": [{"type": "text", "text": "ส่วนหนึ่ง"},
                                          {"type": "text", "text": "อีกส่วน"}]},
    ]
    assert normalize_history(history) == [
        {"role": "user", "content": "สวัสดี"},
        {"role": "assistant", "content": "สวัสดีครับ"},
        {"role": "user", "content": "ภาพนี้"},
        {"role": "assistant", "content": "ส่วนหนึ่ง\nอีกส่วน"},
    ]


def test_build_messages_puts_the_system_prompt_first_and_the_new_message_last():
    messages = build_messages([{"type": "text", "text": "คำถาม"}],
                              [{"role": "system", "content": "old"},
                               {"role": "user", "content": "ก่อนหน้า"}], "  ตอบสั้น ๆ ")
    assert messages == [{"role": "system", "content": "ตอบสั้น ๆ"},
                        {"role": "user", "content": "ก่อนหน้า"},
                        {"role": "user", "content": "คำถาม"}]
    assert build_messages("hi", None, "")[0] == {"role": "user", "content": "hi"}
    assert content_text(None) == ""


# --------------------------------------------------------------- frame policy
def test_frame_ancestors_lists_self_then_the_allowed_origins_once():
    assert frame_ancestors_value([]) == "frame-ancestors 'self'"
    assert frame_ancestors_value(["https://a.example/", "https://a.example", "'self'"]) == \
        "frame-ancestors 'self' https://a.example"
    assert merge_csp("default-src 'self'; frame-ancestors 'none'", "frame-ancestors 'self'") == \
        "default-src 'self'; frame-ancestors 'self'"
    assert merge_csp(None, "frame-ancestors 'self'") == "frame-ancestors 'self'"


# ---------------------------------------------------------------- status
def test_status_banner_for_each_state():
    engine = FakeEngine()
    assert 'data-state="loading"' in status_html(engine)
    engine.state = EngineState.READY
    ready = status_html(engine)
    assert 'data-state="ready"' in ready and "thai-qwen-lora" in ready and "cpu" in ready
    engine.info.demo = True
    demo = status_html(engine)
    assert 'data-state="demo"' in demo and "not meaningful" in demo and "โมเดลสาธิต" in demo
    engine.info.demo = False
    assert "fake/base + LoRA adapter" in status_html(engine)  # a hub id is shown ...
    engine.info.quantization, engine.info.quantization_reason = "none", "none: set by THAI_QUANTIZATION"
    assert "THAI_QUANTIZATION" not in status_html(engine)  # nothing to say when none runs
    engine.info.quantization = "w8a8"
    engine.info.quantization_reason = "w8a8 chosen by THAI_QUANTIZATION=auto: KL 0.0050 <limit>"
    assert "w8a8 chosen by THAI_QUANTIZATION=auto: KL 0.0050 &lt;limit&gt;" in status_html(engine)
    # ... in the tooltip only: the words an analyst reads are plain
    visible = re.sub(r"<[^>]+>", "", status_html(engine))
    assert "fast CPU mode" in visible and "THAI_" not in visible and "KL" not in visible
    engine.info.base_model, engine.info.adapter = "/srv/alice/models/base", "/srv/alice/lora"
    assert "/srv/alice" not in status_html(engine) and "LoRA adapter" in status_html(engine)  # ... a folder never
    engine.state, engine.error = EngineState.ERROR, "no <weights>"
    error = status_html(engine)
    assert 'data-state="error"' in error and "no &lt;weights&gt;" in error
    engine.error = "cannot load base model '/srv/alice/models/base': no file in /srv/alice/models/base"
    assert "/srv/alice" not in status_html(engine) and "cannot load base model" in status_html(engine)


def test_zero_gpu_hardware_is_reported_in_the_log(caplog):
    log = logging.getLogger("test.spaces")
    with caplog.at_level(logging.WARNING, logger="test.spaces"):
        assert warn_if_zero_gpu(log, {"SPACES_ZERO_GPU": "true"}) is True
        assert warn_if_zero_gpu(log, {}) is False
    assert len(caplog.records) == 1 and "ZeroGPU" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- handlers
def make_handlers(**engine_kwargs) -> tuple[UIHandlers, FakeEngine]:
    engine = FakeEngine(**engine_kwargs)
    asyncio.run(engine.start())
    return UIHandlers(Serving(engine, ModelSettings(max_new_tokens=50))), engine


async def collect(agen) -> list:
    return [item async for item in agen]


def test_summary_streams_in_parts_and_ends_with_tokens_and_seconds():
    handlers, engine = make_handlers()
    updates = asyncio.run(collect(handlers.summarize("ข่าววันนี้ฝนตกหนัก", 5, 0.0)))
    assert len(updates) == 5  # one update per generated token
    summaries = [summary for summary, _ in updates]
    assert all(len(a) < len(b) for a, b in zip(summaries, summaries[1:]))
    assert "summarizing" in updates[0][1]
    last = updates[-1][1]
    prompt_tokens = len(engine.requests[0].prompt_ids)
    assert f"{prompt_tokens:,} + 5 = **{prompt_tokens + 5:,}**" in last
    assert "วินาที / s" in last and "length limit" in last
    assert engine.requests[0].params.max_tokens == 5 and engine.requests[0].params.temperature == 0.0


@pytest.mark.parametrize("text", ["", "   \n", "\u200b\u200b"])
def test_empty_text_is_an_error_in_thai_and_english(text):
    handlers, engine = make_handlers()
    with pytest.raises(gr.Error) as info:
        asyncio.run(collect(handlers.summarize(text, 50, 0.7)))
    assert "กรุณาวางข้อความ" in info.value.message and "Please paste" in info.value.message
    assert engine.requests == []


def test_too_long_text_and_unloaded_model_are_explained():
    handlers, _ = make_handlers(max_context=200)
    with pytest.raises(gr.Error) as info:
        asyncio.run(collect(handlers.summarize("ก" * 300, 50, 0.7)))
    assert "ยาวเกิน" in info.value.message and "context" in info.value.message
    with pytest.raises(gr.Error) as info:
        asyncio.run(collect(handlers.summarize("ก" * 200_001, 50, 0.7)))
    assert "too long" in info.value.message and "200,000" in info.value.message
    loading, _ = make_handlers(ready=False)
    with pytest.raises(gr.Error) as info:
        asyncio.run(collect(loading.summarize("ข้อความ", 50, 0.7)))
    assert "ยังโหลดไม่เสร็จ" in info.value.message and "still loading" in info.value.message


def test_stats_use_the_models_prompt_tokens_against_context_minus_summary_length():
    handlers, engine = make_handlers(max_context=1000)
    stats = handlers.text_stats("ฉันรักภาษาไทย", 100)
    expected = len(engine.encode_chat(handlers.serving.summary_messages("ฉันรักภาษาไทย")))
    assert (stats.graphemes, stats.words, stats.tokens, stats.token_limit) == (11, 3, expected, 900)
    loading, _ = make_handlers(ready=False)
    assert loading.text_stats("ฉันรักภาษาไทย", 100).tokens is None


def test_chat_streams_the_reply_with_history_and_system_prompt():
    handlers, engine = make_handlers()
    history = [{"role": "user", "content": [{"type": "text", "text": "ก่อน"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ตอบ"}]}]
    replies = asyncio.run(collect(handlers.chat("สวัสดี", history, "ระบบ", 20, 0.7)))
    assert replies[-1] == "สวัสดี"[::-1]  # the fake engine answers the last message reversed
    assert len(replies) == len("สวัสดี")
    prompt = "".join(chr(i) for i in engine.requests[0].prompt_ids)
    assert prompt == "<system>ระบบ<user>ก่อน<assistant>ตอบ<user>สวัสดี"
    with pytest.raises(gr.Error) as info:
        asyncio.run(collect(handlers.chat("  ", [], "", 20, 0.7)))
    assert "Please type a message" in info.value.message


# ------------------------------------------------------------ mounted app
def test_ui_is_mounted_with_fonts_and_frame_policy():
    settings = Settings.from_overrides({"frame_ancestors": "https://parent.example"})
    with TestClient(create_app(settings, FakeEngine())) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert page.headers["content-security-policy"].endswith(
            "frame-ancestors 'self' https://parent.example")
        assert "x-frame-options" not in page.headers
        head = client.get("/ui/config").json()["head"]
        assert 'href="fonts/fonts.css"' in head  # relative: works under a sub-path
        assert "googleapis" not in page.text + head
        css = client.get("/ui/fonts/fonts.css")
        assert css.status_code == 200 and 'url("sarabun-thai-400.woff2")' in css.text
        font = client.get("/ui/fonts/sarabun-thai-400.woff2")
        assert font.status_code == 200 and font.content[:4] == b"wOF2"
        # the UI's frame policy stays on the UI: API answers are not framable
        assert "frame-ancestors 'self'" not in client.get("/health").headers.get(
            "content-security-policy", "")
        browser = client.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
        assert browser.status_code == 307 and browser.headers["location"].endswith("/ui/")
        assert client.get("/", headers={"Accept": "application/json"}).json()["model"] == "thai-qwen-lora"


def test_ui_can_be_turned_off():
    settings = Settings.from_overrides({"enable_ui": False})
    with TestClient(create_app(settings, FakeEngine())) as client:
        assert client.get("/ui/").status_code == 404
        assert client.get("/", headers={"Accept": "text/html"}, follow_redirects=False).status_code == 200
