"""Bad and unusual input through a real server: each a clear 4xx or a correct answer, never a 5xx.

A table of hand-picked inputs (each with the status and error code it must
get, recorded in test-artifacts/bad_inputs.json), then hypothesis-generated
Thai, English, emoji and invisible-character strings through summarize and
chat. Thai text is NFC-normalised, so canonically equivalent spellings count
the same tokens.
"""

from __future__ import annotations

import json
import unicodedata

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.text import is_blank
from tests.support import ARTIFACTS

CHAT, SUMMARIZE = "/v1/chat/completions", "/v1/summarize"
JSON = "application/json"


def chat(content, **extra) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4,
                       **extra}).encode()


def summarize(text, **extra) -> bytes:
    return json.dumps({"text": text, "max_tokens": 4, **extra}).encode()


# name -> (path, body, content type, expected status, expected error code or None)
CASES = {
    "malformed JSON": (CHAT, b'{"messages": [', JSON, 400, None),
    "JSON array instead of object": (CHAT, b"[1, 2]", JSON, 400, None),
    "empty body": (CHAT, b"", JSON, 400, None),
    "JSON sent as text/plain": (CHAT, chat("hi"), "text/plain", 400, None),
    "messages is a string": (CHAT, b'{"messages": "hi"}', JSON, 400, None),
    "max_tokens is a string": (CHAT, chat("hi", max_tokens="many"), JSON, 400, None),
    "temperature is a boolean": (CHAT, chat("hi", temperature=False), JSON, 400, None),
    "max_tokens is a float": (CHAT, chat("hi", max_tokens=4.5), JSON, 400, None),
    "temperature NaN": (CHAT, b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}', JSON, 400, None),
    "invalid UTF-8 bytes": (CHAT, b'{"messages":[{"role":"user","content":"\xff\xfe\xc3"}]}', JSON, 400, None),
    "unpaired surrogate escape": (CHAT, b'{"messages":[{"role":"user","content":"a\\ud800b"}]}', JSON, 400, None),
    "unknown role": (CHAT, b'{"messages":[{"role":"tool","content":"x"}]}', JSON, 400, None),
    "null content": (CHAT, b'{"messages":[{"role":"user","content":null}],"max_tokens":4}', JSON, 400, None),
    "no messages": (CHAT, b'{"messages":[]}', JSON, 400, None),
    "deeply nested JSON": (CHAT, b'{"messages":' + b"[" * 5000 + b"]" * 5000 + b"}", JSON, 400, None),
    "empty text": (SUMMARIZE, summarize(""), JSON, 400, None),
    "whitespace-only text": (SUMMARIZE, summarize("  \n\t\u3000 "), JSON, 400, None),
    "zero-width-only text": (SUMMARIZE, summarize("\u200b\u200c\u200d\u2060\ufeff"), JSON, 400, None),
    "control-characters-only text": (SUMMARIZE, summarize("\x00\x01\x1b\x7f\x9f"), JSON, 400, None),
    "whitespace-only chat message": (CHAT, chat(" \u200b\n "), JSON, 400, None),
    "control characters inside Thai": (CHAT, chat("สวัสดี\x00\x07 ok\x1b[31m"), JSON, 200, None),
    "mixed Thai, English and emoji": (SUMMARIZE, summarize("ประชุม AI 🤖🇹🇭 meeting ดีมาก 👍🏽 ครับ"), JSON, 200, None),
    "Thai with combining marks out of order": (SUMMARIZE, summarize("ก\u0e48\u0e38ข"), JSON, 200, None),
    "right-to-left and CJK mixed in": (CHAT, chat("สวัสดี مرحبا 你好 שלום"), JSON, 200, None),
    # strategy "single": one call, so a text that does not fit is a 400 with the numbers ...
    "one 20,000-letter Thai word, single call": (SUMMARIZE, summarize("ก" * 20_000, strategy="single"), JSON, 400, "context_length_exceeded"),
    "one 150,000-letter Latin word, single call": (SUMMARIZE, summarize("a" * 150_000, strategy="single"), JSON, 400, "context_length_exceeded"),
    # ... "auto" (the default) splits it, even where no sentence or word boundary is
    "one 20,000-letter Thai word": (SUMMARIZE, summarize("ก" * 20_000), JSON, 200, None),
    "unknown strategy": (SUMMARIZE, summarize("ข่าว", strategy="map-reduce"), JSON, 400, None),
    "stream is a string": (SUMMARIZE, summarize("ข่าว", stream="yes"), JSON, 400, None),
    "text over the schema's 200,000 characters": (SUMMARIZE, summarize("ก" * 200_001), JSON, 400, None),
    "body over THAI_MAX_REQUEST_BYTES": (SUMMARIZE, summarize("ข" * 1_000_000), JSON, 413, "request_too_large"),
    "max_tokens above the limit": (CHAT, chat("hi", max_tokens=10**12), JSON, 400, "max_tokens_too_large"),
    "max_tokens of 10**40": (CHAT, chat("hi", max_tokens=10**40), JSON, 400, "max_tokens_too_large"),
    "max_tokens zero": (CHAT, chat("hi", max_tokens=0), JSON, 400, None),
    "prompt plus max_tokens over the context": (CHAT, chat("ข่าว " * 800, max_tokens=2048), JSON, 400, "context_length_exceeded"),
    "too many messages": (CHAT, json.dumps({"messages": [{"role": "user", "content": "x"}] * 4097}).encode(), JSON, 400, "too_many_messages"),
    "more than 16384 messages": (CHAT, json.dumps({"messages": [{"role": "user", "content": "x"}] * 16385}).encode(), JSON, 400, None),
    "more than THAI_MAX_CHAT_BYTES": (CHAT, json.dumps({"messages": [{"role": "user", "content": "ก" * 200_000}] * 2}, ensure_ascii=False).encode(), JSON, 400, "messages_too_large"),
    "nine stop sequences": (CHAT, chat("hi", stop=[str(i) for i in range(9)]), JSON, 400, None),
    "n of 17": (CHAT, chat("hi", n=17), JSON, 400, None),
    "unknown model": (CHAT, chat("hi", model="gpt-4"), JSON, 404, "model_not_found"),
}


@pytest.fixture(scope="module")
def outcomes():
    seen: dict[str, int] = {}
    yield seen
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bad_inputs.json").write_text(json.dumps(seen, indent=2, ensure_ascii=False))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_answer(live_server, outcomes, name):
    path, body, content_type, status, code = CASES[name]
    r = httpx.post(live_server.url + path, content=body, headers={"content-type": content_type},
                   timeout=120)
    outcomes[name] = r.status_code
    assert r.status_code == status, r.text[:500]
    payload = r.json()
    if status >= 400:
        error = payload["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        assert "Traceback" not in r.text
        if code:
            assert error["code"] == code
        if code == "context_length_exceeded":  # the numbers are in the message
            assert "4096" in error["message"] and "tokens" in error["message"]
    elif path == CHAT:
        assert payload["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert payload["finish_reason"] in ("stop", "length") and payload["usage"]["output_tokens"] >= 1


def test_nfc_spellings_count_the_same(live_server):
    """Tone mark before vowel (unnormalised) and after it (NFC) are the same text."""
    composed, decomposed = "ก\u0e38\u0e48", "ก\u0e48\u0e38"
    assert unicodedata.normalize("NFC", decomposed) == composed
    counts = [httpx.post(live_server.url + SUMMARIZE, json={"text": t * 10, "max_tokens": 1},
                         timeout=60).json()["usage"]["input_tokens"] for t in (composed, decomposed)]
    assert counts[0] == counts[1]


THAI = st.characters(min_codepoint=0x0E01, max_codepoint=0x0E5B)
MIXED = st.one_of(THAI, st.characters(codec="utf-8", categories=("L", "N", "P", "Zs", "So", "Mn")),
                  st.sampled_from(["\u200b", "\ufeff", "\n", "\t", "🇹🇭", "👍🏽", "\x00", "\x7f"]))
MIXED_TEXT = st.lists(MIXED, min_size=1, max_size=200).map("".join)
FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(text=MIXED_TEXT)
def test_summarize_generated_thai_and_mixed_text(live_server, text):
    r = httpx.post(live_server.url + SUMMARIZE, json={"text": text, "max_tokens": 3}, timeout=60)
    if is_blank(text):
        assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    else:
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["input_tokens"] > 0


@FUZZ
@given(messages=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), MIXED_TEXT),
                         min_size=1, max_size=4),
       stream=st.booleans())
def test_chat_generated_thai_and_mixed_messages(live_server, messages, stream):
    body = {"messages": [{"role": role, "content": text} for role, text in messages],
            "max_tokens": 3, "stream": stream}
    r = httpx.post(live_server.url + CHAT, json=body, timeout=60)
    users = [text for role, text in messages if role == "user"]
    if users and all(is_blank(t) for t in users):
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        return
    assert r.status_code == 200, r.text[:300]
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
