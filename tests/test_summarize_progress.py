"""A long text's progress while its pieces are written: the serving layer's token counts
(``tokens_done`` every few tokens, ``chunks_done`` as pieces finish) through a real server
on the demo checkpoint, and the UI's line for given events, each chunk shown in order."""

from __future__ import annotations

import asyncio
import json

import httpx

from api.protocol_summarize import (
    SummarizeDelta,
    SummarizeProgress,
    SummarizeResponse,
    SummarizeUsage,
)
from api.serving import Serving
from api.serving.summarize import PROGRESS_EVERY_TOKENS
from api.settings import ModelSettings
from tests.fakes import FakeEngine
from tests.test_summarize_long import thai_text
from thai_ui.handlers import UIHandlers, _progress_line


def stream_events(url: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", url + "/v1/summarize", json={**body, "stream": True},
                      timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def pieces_of(url: str, chars: int) -> int:
    """Pieces round 1 has for ``chars`` characters of the corpus (a quick stream, closed)."""
    with httpx.stream("POST", url + "/v1/summarize", timeout=600,
                      json={"text": thai_text(chars), "max_tokens": 64, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])["chunks_total"]
    raise AssertionError("no event")


def three_piece_chars(url: str) -> int:
    """Characters of the corpus that the server splits into 3 pieces (summaries of 64 tokens)."""
    chars = 6000
    for _ in range(8):
        n = pieces_of(url, chars)
        if n == 3:
            return chars
        chars = int(chars * 3 / max(n, 1)) + (500 if n < 3 else -500)
    raise AssertionError(f"no text of 3 pieces found near {chars} characters")


# ------------------------------------------------------------ live API
def test_live_progress_counts_tokens_in_each_round_and_matches_usage(live_server):
    # the live server's pieces are THAI_SUMMARY_CHUNK_TOKENS (1024) long: a text of 3
    chars = three_piece_chars(live_server.url)
    events = stream_events(live_server.url, {"text": thai_text(chars), "max_tokens": 64,
                                             "temperature": 0})
    result = events[-1]
    assert result["object"] == "summarize.result" and result["chunks"] >= 4
    progress = [e for e in events if e["object"] == "summarize.progress"]
    rounds = sorted({e["round"] for e in progress})
    assert rounds == list(range(1, result["rounds"] + 1))
    pieces_tokens = 0
    for round_ in rounds:
        mine = [e for e in progress if e["round"] == round_]
        total = mine[0]["chunks_total"]
        assert mine[0]["chunks_done"] == 0 and mine[0]["tokens_done"] == 0
        assert all(e["chunks_total"] == total and e["tokens_budget"] == mine[0]["tokens_budget"]
                   for e in mine)
        if mine[0]["final"]:
            assert len(mine) == 1 and total == 1 and mine[0]["tokens_budget"] == 64
            continue
        done = [e["chunks_done"] for e in mine]
        tokens = [e["tokens_done"] for e in mine]
        # chunks 0..n, each once as it finishes, in order; tokens never go back
        assert all(b - a in (0, 1) for a, b in zip(done, done[1:])) and done[-1] == total
        assert tokens == sorted(tokens) and tokens[-1] <= mine[0]["tokens_budget"]
        # the tokens move before the first piece is done, and a token event (same chunks)
        # comes each time the count passes a multiple of the step
        assert any(e["chunks_done"] == 0 and e["tokens_done"] > 0 for e in mine), mine
        for a, b in zip(mine, mine[1:]):
            if b["chunks_done"] == a["chunks_done"]:
                assert b["tokens_done"] // PROGRESS_EVERY_TOKENS > \
                    a["tokens_done"] // PROGRESS_EVERY_TOKENS, (a, b)
        pieces_tokens += tokens[-1]
    assert progress[0]["chunks_total"] == 3
    # the pieces' tokens, then the final call's (at most its max_tokens) make the usage
    output = result["usage"]["output_tokens"]
    assert 0 <= output - pieces_tokens <= 64, (output, pieces_tokens)
    deltas = "".join(e["delta"] for e in events if e["object"] == "summarize.delta")
    assert deltas.strip() == result["summary"]


# ----------------------------------------------------------------- UI
def event(done: int, total: int, tokens: int, budget: int = 192, round_: int = 1,
          final: bool = False) -> SummarizeProgress:
    return SummarizeProgress(round=round_, chunks_done=done, chunks_total=total, final=final,
                             tokens_done=tokens, tokens_budget=budget)


def test_the_progress_line_names_chunks_done_and_tokens_written():
    start = _progress_line(event(0, 3, 0), 0.5)
    assert "แบ่งเป็น 3 ส่วน / split into 3 chunks" in start and "รอบที่ 1 / round 1" in start
    assert "tokens written" not in start and start.count("▰") == 0
    writing = _progress_line(event(0, 3, 64), 1.0)
    assert "ส่วนที่เสร็จ 0 จาก 3 / 0 of 3 chunks done" in writing
    assert "เขียนแล้ว 64 โทเค็น / 64 tokens written" in writing
    assert writing.count("▰") == 3 and writing.count("▱") == 7  # 64 of 192 tokens
    one = _progress_line(event(1, 3, 50), 1.5)
    assert "ส่วนที่เสร็จ 1 จาก 3 / 1 of 3 chunks done" in one and "50 tokens written" in one
    assert one.count("▰") == 3  # a third of the pieces is more than 50 of 192 tokens
    later = _progress_line(event(2, 12, 1234, budget=768, round_=2), 2.0)
    assert "รอบที่ 2 / round 2" in later and "2 of 12 chunks done" in later
    assert "1,234 tokens written" in later and later.count("▰") == 10
    assert "เวลา / time: **2.0**" in later


class ScriptedRun:
    """A summary's events as a serving run yields them, all at once."""

    def __init__(self, events):
        self.events, self.closed = list(events), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    async def aclose(self):
        self.closed = True


def test_the_ui_shows_every_chunk_done_in_order_when_they_arrive_together():
    serving = Serving(FakeEngine(), ModelSettings())
    handlers = UIHandlers(serving)
    usage = SummarizeUsage(input_tokens=500, output_tokens=90, total_tokens=590)
    script = [event(0, 3, 0), event(0, 3, 16), event(0, 3, 32), event(0, 3, 48),
              event(1, 3, 60), event(2, 3, 60), event(3, 3, 60),  # the same step
              SummarizeProgress(round=2, chunks_done=0, chunks_total=1, final=True,
                                tokens_budget=30),
              SummarizeDelta(delta="สรุป"), SummarizeDelta(delta="ข่าว"),
              SummarizeResponse(summary="สรุปข่าว", model="m", usage=usage,
                                finish_reason="stop", chunks=4, rounds=2)]
    run = ScriptedRun(script)

    async def events(request, tenant):
        return run

    serving.summarize_events = events

    async def collect():
        return [u async for u in handlers.summarize("ข่าว" * 10, 30, 0.0)]

    try:
        updates = asyncio.run(collect())
    finally:
        handlers.close()
    lines = [line for _, line in updates]
    progress = [line for line in lines if line.startswith("ข้อความยาว")]
    assert len(progress) == 7  # one per progress event of round 1, none skipped
    assert [("ส่วนที่เสร็จ " in line and line.split("ส่วนที่เสร็จ ")[1].split(" ")[0]) or "split"
            for line in progress] == ["split", "0", "0", "0", "1", "2", "3"]
    assert [line.split("เขียนแล้ว ")[1].split(" ")[0] for line in progress[1:]] == \
        ["16", "32", "48", "60", "60", "60"]
    assert all(" จาก 3 / " in line and " of 3 chunks done" in line for line in progress[1:])
    assert any(line.startswith("รวมสรุป") for line in lines)
    assert updates[-1][0] == "สรุปข่าว" and updates[-1][1].startswith("เสร็จ / done")
    assert run.closed
