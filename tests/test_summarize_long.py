"""Long texts summarized anyway: pieces, rounds, limits, streaming, cancellation; and the
document route's form handling. Unit tests over the fake engine (tokens are characters,
a reply is the user message reversed), plus live tests through a real server on the demo
checkpoint at the end (marked by their ``model_env`` fixture)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from api.engine.errors import EngineOutOfMemoryError
from api.protocol_summarize import (
    SummarizeDelta,
    SummarizeProgress,
    SummarizeRequest,
    SummarizeResponse,
)
from api.routes.deps import close_on_disconnect
from api.server import create_app
from api.serving import Serving
from api.serving import summarize as summarize_module
from api.settings import ModelSettings, Settings
from tests.fakes import FakeEngine
from tests.support import REPO, start_server

CORPUS = (REPO / "assets" / "thai_corpus.txt").read_text(encoding="utf-8")
SENTENCES = [line.strip() for line in CORPUS.splitlines() if line.strip()]


def thai_text(chars: int) -> str:
    """``chars`` characters of the corpus, repeated, cut at a line."""
    out, size = [], 0
    while size < chars:
        for line in SENTENCES:
            out.append(line)
            size += len(line) + 1
            if size >= chars:
                break
    return "\n".join(out)[:chars]


def settings(**model) -> Settings:
    return Settings.from_overrides({"enable_ui": False, "summary_chunk_tokens": 200, **model})


def make_client(engine: FakeEngine | None = None, **overrides) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine(max_batch_size=4)
    return TestClient(create_app(settings(**overrides), engine), raise_server_exceptions=False), engine


def serving(engine: FakeEngine, **model) -> Serving:
    return Serving(engine, ModelSettings(**{"summary_chunk_tokens": 200, **model}))


def sse(response) -> list:
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text[-500:]
    return [json.loads(line) for line in lines[:-1]]


# ----------------------------------------------------------------- fitting
def test_text_that_fits_is_one_call_as_before():
    client, engine = make_client()
    with client:
        r = client.post("/v1/summarize", json={"text": "ข้อความสั้น", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chunks"] == 1 and body["rounds"] == 1 and len(engine.requests) == 1
    assert body["usage"]["input_tokens"] == len(engine.requests[0].prompt_ids)
    assert body["usage"]["output_tokens"] == 5 and body["finish_reason"] == "length"


# ---------------------------------------------------------------- long text
def test_long_text_is_split_summarized_in_rounds_and_counted():
    client, engine = make_client()
    text = thai_text(3000)
    with client:
        r = client.post("/v1/summarize", json={"text": text, "max_tokens": 40})
        template = len(engine.encode_chat(Serving(engine, ModelSettings())._prompt_messages("")))
    assert r.status_code == 200, r.text
    body = r.json()
    calls = engine.requests
    assert body["chunks"] == len(calls) > 2 and body["rounds"] >= 2
    # usage: every call, all rounds
    assert body["usage"]["input_tokens"] == sum(len(c.prompt_ids) for c in calls)
    outputs = [min(c.params.max_tokens, len("".join(map(chr, c.prompt_ids)).rsplit(">", 1)[-1]))
               for c in calls]
    assert body["usage"]["output_tokens"] == sum(outputs)
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + body["usage"]["output_tokens"]
    # pieces: at most summary_chunk_tokens of text each, summaries at most a quarter of that;
    # the final call has the request's max_tokens
    for call in calls[:-1]:
        assert len(call.prompt_ids) - template <= 200 and call.params.max_tokens == 40
    assert calls[-1].params.max_tokens == 40
    assert body["summary"] and body["finish_reason"] in ("stop", "length")


def test_recursion_goes_several_rounds_and_shrinks_each_time():
    engine = FakeEngine(max_batch_size=8)
    s = serving(engine, summary_chunk_tokens=64, summary_max_chunks=10000)

    async def main():
        await engine.start()
        run = await s.summarize_events(SummarizeRequest(text=thai_text(20000), max_tokens=100))
        return [event async for event in run]

    events = asyncio.run(main())
    result = events[-1]
    assert isinstance(result, SummarizeResponse)
    starts = [e for e in events if isinstance(e, SummarizeProgress)
              and e.chunks_done == 0 and e.tokens_done == 0]
    assert [e.round for e in starts] == list(range(1, result.rounds + 1)) and result.rounds >= 3
    totals = [e.chunks_total for e in starts]
    assert totals == sorted(totals, reverse=True) and totals[-1] == 1 and starts[-1].final
    assert sum(totals) == result.chunks == len(engine.requests)
    # a piece's summary is at most a quarter of a piece (64 // 4), the final one max_tokens
    assert {r.params.max_tokens for r in engine.requests[:-1]} == {16}
    assert engine.requests[-1].params.max_tokens == 100


def test_concurrency_is_bounded_by_the_engine_batch_size():
    for batch in (1, 3):
        engine = FakeEngine(max_batch_size=batch, delay=0.002)
        client, _ = make_client(engine)
        with client:
            r = client.post("/v1/summarize", json={"text": thai_text(4000), "max_tokens": 30})
        assert r.status_code == 200 and r.json()["chunks"] > batch + 1
        assert engine.max_running == batch, (batch, engine.max_running)
        assert all(stream.closed for stream in engine.streams)


def test_text_beyond_the_context_window_is_split_even_under_the_chunk_budget():
    engine = FakeEngine(max_context=400, max_batch_size=4)
    client, _ = make_client(engine, summary_chunk_tokens=4096)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(1500), "max_tokens": 50})
    assert r.status_code == 200, r.text
    assert r.json()["chunks"] > 1
    assert all(len(c.prompt_ids) + c.params.max_tokens <= 400 for c in engine.requests)


# ------------------------------------------------------------------- limits
def test_strategy_single_is_todays_behaviour():
    engine = FakeEngine(max_context=400)
    client, _ = make_client(engine)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(1500), "strategy": "single"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        fits = client.post("/v1/summarize", json={"text": "สั้น", "strategy": "single",
                                                   "max_tokens": 3})
        assert fits.status_code == 200 and fits.json()["chunks"] == 1
        bad = client.post("/v1/summarize", json={"text": "สั้น", "strategy": "map-reduce"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
    assert len(engine.requests) == 1


def test_summary_max_chunks_is_a_400_naming_the_limit_before_any_generation():
    client, engine = make_client(summary_max_chunks=5)
    with client:
        for stream in (False, True):
            r = client.post("/v1/summarize", json={"text": thai_text(5000), "stream": stream})
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert error["code"] == "too_many_chunks" and "THAI_SUMMARY_MAX_CHUNKS" in error["message"]
            assert "5" in error["message"] and error["param"] == "text"
    assert engine.requests == []


def test_expected_later_rounds_count_against_the_limit():
    """The pieces of the first round fit the limit, but with the pieces their summaries may
    need and the final call they do not: refused before any generation."""
    from api.documents.chunking import split_text

    text = thai_text(1400)
    pieces = len(split_text(text, 64, len))  # 64: the chunk budget, the fake counts characters
    expected = summarize_module._expected_calls(pieces, 16, 64)
    assert expected > pieces + 1
    client, engine = make_client(summary_max_chunks=pieces + 1, summary_chunk_tokens=64)
    with client:
        r = client.post("/v1/summarize", json={"text": text, "max_tokens": 100})
        assert r.status_code == 400, r.text
        assert f"may take {expected} calls" in r.json()["error"]["message"]
        assert engine.requests == []
        client.app.state.serving.settings.summary_max_chunks = expected
        r = client.post("/v1/summarize", json={"text": text, "max_tokens": 100})
        assert r.status_code == 200 and r.json()["chunks"] <= expected  # an upper bound


def test_max_tokens_that_leaves_no_room_for_text_is_a_400():
    engine = FakeEngine(max_context=300)
    client, _ = make_client(engine)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(2000), "max_tokens": 280})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"


def test_a_round_that_does_not_shrink_is_an_error_not_a_loop(monkeypatch):
    # pieces of one character: their summaries (the prompt reversed, 16 tokens) are longer
    monkeypatch.setattr(summarize_module, "_split_text",
                        lambda text, max_tokens, count: list(text.replace("\n", "")))
    client, engine = make_client(summary_chunk_tokens=64)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(100), "max_tokens": 100})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "summary_not_shrinking", r.text
    assert all(stream.closed for stream in engine.streams)


def test_rounds_are_bounded(monkeypatch):
    monkeypatch.setattr(summarize_module, "MAX_ROUNDS", 1)
    client, engine = make_client(summary_chunk_tokens=64, summary_max_chunks=10000)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(20000), "max_tokens": 100})
    assert r.status_code == 400 and "after 1 rounds" in r.json()["error"]["message"], r.text


def test_empty_text_unknown_model_and_loading_are_statuses_with_or_without_stream():
    client, _ = make_client()
    with client:
        for stream in (False, True):
            r = client.post("/v1/summarize", json={"text": " \u200b ", "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "text"
            r = client.post("/v1/summarize", json={"text": thai_text(3000), "model": "gpt-4",
                                                   "stream": stream})
            assert r.status_code == 404
    loading, _ = make_client(FakeEngine(ready=False))
    with loading:
        for stream in (False, True):
            r = loading.post("/v1/summarize", json={"text": thai_text(3000), "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


def test_body_limit_admits_200000_thai_characters_as_escaped_json():
    client, _ = make_client(FakeEngine(max_batch_size=16, max_context=100_000),
                            summary_chunk_tokens=32768)
    text = thai_text(200_000)
    body = json.dumps({"text": text, "max_tokens": 5, "strategy": "single"}).encode()
    assert 1_100_000 < len(body) < 2 * 1024 * 1024  # \\uXXXX: 6 bytes a character
    with client:
        r = client.post("/v1/summarize", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert SummarizeRequest.model_fields["text"].metadata[-1].max_length >= 200_000


# ---------------------------------------------------------------- streaming
def test_stream_sends_progress_then_deltas_then_result_then_done():
    client, engine = make_client()
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(2500), "max_tokens": 30,
                                               "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    events = sse(r)
    kinds = [e["object"] for e in events]
    first_delta = kinds.index("summarize.delta")
    assert set(kinds[:first_delta]) == {"summarize.progress"}
    assert set(kinds[first_delta:-1]) == {"summarize.delta"} and kinds[-1] == "summarize.result"
    progress = [e for e in events if e["object"] == "summarize.progress"]
    assert progress[0] == {"object": "summarize.progress", "round": 1, "chunks_done": 0,
                           "chunks_total": progress[0]["chunks_total"], "final": False,
                           "tokens_done": 0, "tokens_budget": progress[0]["tokens_budget"]}
    round1 = [e for e in progress if e["round"] == 1]
    done = [e["chunks_done"] for e in round1]
    assert sorted(set(done)) == list(range(progress[0]["chunks_total"] + 1)) and done == sorted(done)
    tokens = [e["tokens_done"] for e in round1]
    assert tokens == sorted(tokens) and tokens[-1] <= progress[0]["tokens_budget"]
    assert progress[-1]["final"] is True and progress[-1]["chunks_total"] == 1
    result = events[-1]
    deltas = "".join(e["delta"] for e in events if e["object"] == "summarize.delta")
    assert deltas.strip() == result["summary"]
    assert result["chunks"] == len(engine.requests) == sum(
        e["chunks_total"] for e in progress if e["chunks_done"] == 0 and e["tokens_done"] == 0)
    assert set(result) == {"object", "summary", "model", "usage", "finish_reason", "chunks", "rounds"}


def test_stream_of_a_text_that_fits():
    client, _ = make_client()
    with client:
        events = sse(client.post("/v1/summarize", json={"text": "สวัสดี", "stream": True}))
    assert events[0] == {"object": "summarize.progress", "round": 1, "chunks_done": 0,
                         "chunks_total": 1, "final": True, "tokens_done": 0,
                         "tokens_budget": events[0]["tokens_budget"]}
    deltas = "".join(e["delta"] for e in events[1:-1])
    assert deltas.startswith("สวัสดี"[::-1]) and deltas.strip() == events[-1]["summary"]
    assert events[-1]["object"] == "summarize.result" and events[-1]["chunks"] == 1


def test_failure_mid_stream_is_an_error_event_and_a_status_without_stream():
    client, engine = make_client(FakeEngine(max_batch_size=4, fail=EngineOutOfMemoryError("oom")))
    with client:
        events = sse(client.post("/v1/summarize", json={"text": thai_text(3000), "stream": True}))
        assert events[0]["object"] == "summarize.progress"
        assert events[-1]["error"]["code"] == "out_of_memory"
        r = client.post("/v1/summarize", json={"text": thai_text(3000)})
        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
    assert all(stream.closed for stream in engine.streams)


# ------------------------------------------------------------- cancellation
async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_cancelling_a_summary_closes_every_chunk_stream():
    engine = FakeEngine(max_batch_size=4, delay=0.05)
    s = serving(engine)

    async def main():
        await engine.start()
        task = asyncio.ensure_future(s.summarize(SummarizeRequest(text=thai_text(4000))))
        await _wait_for(lambda: engine.running == 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.cancelled == 4 and engine.running == 0
    assert engine.streams and all(stream.closed for stream in engine.streams)


def test_closing_the_run_closes_every_chunk_stream_and_the_progress_callback_sees_rounds():
    engine = FakeEngine(max_batch_size=3, delay=0.05)
    s = serving(engine)
    seen = []

    async def main():
        await engine.start()
        run = await s.summarize_events(SummarizeRequest(text=thai_text(4000)))
        async for event in run:
            seen.append(event)
            if isinstance(event, SummarizeProgress) and event.chunks_done == 2:
                break
        await run.aclose()

    asyncio.run(main())
    assert engine.cancelled == 3 and engine.running == 0
    assert all(stream.closed for stream in engine.streams)

    engine = FakeEngine(max_batch_size=3)
    s = serving(engine)
    progress = []

    async def with_callback():
        await engine.start()
        return await s.summarize(SummarizeRequest(text=thai_text(3000), max_tokens=20),
                                 on_progress=progress.append)

    result = asyncio.run(with_callback())
    assert progress[0].chunks_done == 0 and progress[-1].final and result.chunks > 1


def test_client_disconnect_closes_the_event_stream_between_events():
    """The SSE route stops the run when the client leaves, though no event is due."""
    engine = FakeEngine(max_batch_size=2, delay=0.2)
    s = serving(engine)

    class FakeRequest:
        method, url = "POST", httpx.URL("http://test/v1/summarize")

        def __init__(self):
            self.gone = asyncio.Event()

        async def receive(self):
            await self.gone.wait()
            return {"type": "http.disconnect"}

    async def main():
        await engine.start()
        request = FakeRequest()
        events = await s.summarize_stream(SummarizeRequest(text=thai_text(3000), stream=True))
        stream = close_on_disconnect(request, events)
        first = await stream.__anext__()
        assert "summarize.progress" in first
        pending = asyncio.ensure_future(stream.__anext__())
        await _wait_for(lambda: engine.running == 2)
        request.gone.set()
        with pytest.raises(StopAsyncIteration):
            await pending

    asyncio.run(main())
    assert engine.cancelled == 2 and engine.running == 0
    assert all(stream.closed for stream in engine.streams)


def test_http_client_that_leaves_cancels_the_pieces():
    """Non-streamed: the route's disconnect watch cancels the summary (TestClient can't
    leave, so the serving call is cancelled as cancel_on_disconnect does)."""
    engine = FakeEngine(max_batch_size=4, delay=0.05)
    s = serving(engine)

    async def main():
        await engine.start()
        from api.routes.deps import cancel_on_disconnect

        class Leaving:
            method, url = "POST", httpx.URL("http://test/v1/summarize")

            async def receive(self):
                await _wait_for(lambda: engine.running == 4)
                return {"type": "http.disconnect"}

        from api.errors import ClientDisconnectedError

        with pytest.raises(ClientDisconnectedError):
            await cancel_on_disconnect(Leaving(), s.summarize(SummarizeRequest(text=thai_text(4000))))

    asyncio.run(main())
    assert engine.cancelled == 4 and engine.running == 0
    assert all(stream.closed for stream in engine.streams)


def test_in_process_events_are_typed():
    engine = FakeEngine(max_batch_size=2)
    s = serving(engine)

    async def main():
        await engine.start()
        run = await s.summarize_events(SummarizeRequest(text=thai_text(1500), max_tokens=10))
        return [event async for event in run]

    events = asyncio.run(main())
    assert isinstance(events[0], SummarizeProgress) and isinstance(events[-1], SummarizeResponse)
    assert any(isinstance(e, SummarizeDelta) for e in events)


# ----------------------------------------------------------------- documents
@pytest.fixture
def doc_client():
    client, engine = make_client(document_max_bytes=16384)
    with client:
        yield client, engine


def post_document(client, files=None, data=None, **kwargs):
    return client.post("/v1/summarize/document", files=files, data=data, **kwargs)


def test_document_txt_is_summarized_with_its_details(doc_client):
    client, engine = doc_client
    text = thai_text(2500)
    r = post_document(client, files={"file": ("ข่าว.txt", text.encode(), "text/plain")},
                      data={"max_tokens": "30", "temperature": "0"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chunks"] > 1 and body["document"]["filename"] == "ข่าว.txt"
    assert body["document"]["characters"] >= 2000
    assert all(c.params.temperature == 0 for c in engine.requests)


def test_document_stream(doc_client):
    client, _ = doc_client
    r = post_document(client, files={"file": ("a.txt", "สวัสดีครับ".encode(), "text/plain")},
                      data={"stream": "true"})
    events = sse(r)
    assert events[0]["object"] == "summarize.progress"
    assert events[-1]["object"] == "summarize.result" and events[-1]["document"]["filename"] == "a.txt"


@pytest.mark.parametrize("kwargs, param, code", [
    ({"json": {"text": "x"}}, None, "invalid_content_type"),
    ({"content": b"file=abc", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     None, "invalid_content_type"),
    ({"files": {"other": ("a.txt", b"abc", "text/plain")}}, "other", "unknown_field"),
    ({"data": {"max_tokens": "5"}, "files": {"x": ("a.txt", b"a", "text/plain")}}, "x", "unknown_field"),
    ({"files": {"max_tokens": (None, "5")}}, "file", "missing_file"),
    ({"files": {"file": (None, "just text")}}, "file", None),
    ({"files": {"file": ("a.txt", b"abc", "text/plain")}, "data": {"max_token": "5"}},
     "max_token", "unknown_field"),
    ({"files": {"file": ("a.txt", b"abc", "text/plain")}, "data": {"max_tokens": "many"}},
     "max_tokens", None),
    ({"files": {"file": ("a.txt", b"abc", "text/plain")}, "data": {"strategy": "fast"}},
     "strategy", None),
    ({"files": {"file": ("a.txt", b"abc", "text/plain")}, "data": {"stream": "perhaps"}},
     "stream", None),
    ({"files": [("file", ("a.txt", b"abc", "text/plain")), ("file", ("b.txt", b"d", "text/plain"))]},
     None, None),
    ({"files": {"file": ("a.txt", b"", "text/plain")}}, "file", None),
])
def test_document_form_errors_are_clear_400s(doc_client, kwargs, param, code):
    client, engine = doc_client
    r = post_document(client, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if code:
        assert error["code"] == code
    assert engine.requests == []


def test_document_model_and_max_tokens_are_checked(doc_client):
    client, _ = doc_client
    file = {"file": ("a.txt", "ข้อความ".encode(), "text/plain")}
    assert post_document(client, files=file, data={"model": "gpt-4"}).status_code == 404
    r = post_document(client, files=file, data={"max_tokens": "100000"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"


def test_document_over_the_limit_is_413_with_or_without_content_length(doc_client):
    client, engine = doc_client
    big = ("ก" * 40000).encode()  # 120,000 bytes, over 16 KiB + 64 KiB
    r = post_document(client, files={"file": ("a.txt", big, "text/plain")})
    assert r.status_code == 413 and "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]
    # within the body limit (the document limit plus the form's room) but over the file limit
    r = post_document(client, files={"file": ("a.txt", b"a" * 20000, "text/plain")})
    assert r.status_code == 413 and "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]
    # streamed, without Content-Length: cut once the count passes the limit
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    sent = []

    def body():
        yield head
        for _ in range(200):  # 200 x 2 KiB, far past 16 KiB + 64 KiB
            sent.append(1)
            yield b"a" * 1024 * 2
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/summarize/document", content=body(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]
    assert engine.requests == []
    # other routes keep THAI_MAX_REQUEST_BYTES
    r = client.post("/v1/summarize", content=b"x" * (3 * 1024 * 1024),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "THAI_MAX_REQUEST_BYTES" in r.json()["error"]["message"]


def test_document_route_needs_the_key_and_counts_in_the_rate_limit():
    # one request a minute: files are read in spawned processes, and no refill may race them
    app = create_app(Settings.from_overrides({
        "enable_ui": False, "api_keys": "analyst-7f3a9c2e", "rate_limit_per_minute": 1,
        "rate_limit_burst": 2}), FakeEngine())
    file = {"file": ("a.txt", "ข้อความ".encode(), "text/plain")}
    with TestClient(app) as client:
        assert post_document(client, files=file).status_code == 401
        auth = {"Authorization": "Bearer analyst-7f3a9c2e"}
        statuses = [post_document(client, files=file, headers=auth).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200] and statuses[2] == 429


def test_openapi_documents_the_new_fields_and_the_upload(doc_client):
    client, _ = doc_client
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["SummarizeRequest"]["properties"]
    assert {"strategy", "stream"} <= set(props)
    response = schema["components"]["schemas"]["SummarizeResponse"]["properties"]
    assert {"chunks", "rounds"} <= set(response)
    operation = schema["paths"]["/v1/summarize/document"]["post"]
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["file"] == {**form["properties"]["file"], "type": "string",
                                          "format": "binary"}
    assert form["required"] == ["file"] and form["additionalProperties"] is False
    assert {"max_tokens", "temperature", "top_p", "model", "strategy", "stream"} <= set(form["properties"])
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/SummarizeDocumentResponse")
    assert {"413", "400"} <= set(operation["responses"])


# ----------------------------------------------------------- real server
LIVE_ENV = {"THAI_SUMMARY_CHUNK_TOKENS": "512", "THAI_SUMMARY_MAX_CHUNKS": "1000",
            "THAI_ENABLE_UI": "false",
            "THAI_MAX_NEW_TOKENS": "24", "THAI_DOCUMENT_MAX_BYTES": str(2 * 1024 * 1024)}


@pytest.fixture(scope="module")
def long_server(model_env, tmp_path_factory):
    server = start_server({**model_env, **LIVE_ENV}, tmp_path_factory.mktemp("long"))
    yield server
    server.stop()


def test_live_100000_characters_through_summarize(long_server, capsys):
    text = thai_text(100_000)
    started = time.perf_counter()
    r = httpx.post(long_server.url + "/v1/summarize", json={"text": text, "max_tokens": 24},
                   timeout=1800)
    seconds = time.perf_counter() - started
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chunks"] > 1 and body["rounds"] >= 2
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0
    with capsys.disabled():
        print(f"\n100,000 characters: {body['chunks']} calls in {body['rounds']} rounds, "
              f"{seconds:.1f}s, usage {body['usage']}")
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "summarize_long_100k.json").write_text(json.dumps(
        {"characters": len(text), "seconds": round(seconds, 2), "chunks": body["chunks"],
         "rounds": body["rounds"], "usage": body["usage"]}, indent=2))


def test_live_stream_of_a_long_text(long_server):
    events = []
    with httpx.stream("POST", long_server.url + "/v1/summarize", timeout=600,
                      json={"text": thai_text(6000), "max_tokens": 16, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[0]["object"] == "summarize.progress" and events[0]["round"] == 1
    assert events[-1]["object"] == "summarize.result" and events[-1]["chunks"] > 1


def test_live_documents_of_every_kind(long_server, tmp_path):
    from tests.documents_support import docx_bytes, html_bytes, markdown_bytes, pdf_bytes

    text = thai_text(3000)
    files = {"ข่าว.txt": (text.encode(), "text/plain"),
             "report.md": (markdown_bytes(text), "text/markdown"),
             "page.html": (html_bytes(text), "text/html"),
             "report.docx": (docx_bytes(text), "application/vnd.openxmlformats-officedocument"
                                                 ".wordprocessingml.document"),
             "report.pdf": (pdf_bytes(text), "application/pdf")}
    for name, (data, mime) in files.items():
        r = httpx.post(long_server.url + "/v1/summarize/document", timeout=600,
                       files={"file": (name, data, mime)}, data={"max_tokens": "16"})
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert body["document"]["filename"] == name and body["chunks"] > 1, (name, body)
        assert body["document"]["characters"] > 2000, (name, body["document"])
        if name.endswith((".pdf", ".docx")):
            assert body["document"]["pages"] >= 1


def test_live_oversize_document_is_413(long_server):
    r = httpx.post(long_server.url + "/v1/summarize/document", timeout=60,
                   files={"file": ("big.txt", b"a" * (3 * 1024 * 1024), "text/plain")})
    assert r.status_code == 413 and "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]


def test_live_generated_nginx_admits_documents_up_to_their_own_limit(long_server, tmp_path):
    """The generated site gives /v1/summarize/document the document limit (plus the form),
    every other path THAI_MAX_REQUEST_BYTES; both answer 413 in the API's envelope."""
    from tests.deploy_support import generate, nginx_wrapper, start_nginx
    from tests.support import free_port, require_tool

    require_tool("nginx")
    port = free_port()
    out = tmp_path / "out"
    generate(out, "--install-dir", str(REPO), "--domain", "localhost", "--no-tls",
             "--listen-address", "127.0.0.1", "--http-port", str(port),
             env={"THAI_PORT": long_server.url.rsplit(":", 1)[1], "THAI_MAX_REQUEST_BYTES": "65536",
                  "THAI_DOCUMENT_MAX_BYTES": LIVE_ENV["THAI_DOCUMENT_MAX_BYTES"]})
    site = (out / "thai-model-api.nginx").read_text()
    limit = int(LIVE_ENV["THAI_DOCUMENT_MAX_BYTES"]) + 64 * 1024
    assert f"client_max_body_size {limit};" in site and "client_max_body_size 65536;" in site
    ui_upload = site.split("location = /ui/gradio_api/upload {", 1)[1].split("}", 1)[0]
    assert f"client_max_body_size {limit};" in ui_upload, "the UI's uploads are documents too"
    assert f"THAI_DOCUMENT_MAX_BYTES={LIVE_ENV['THAI_DOCUMENT_MAX_BYTES']}" in \
        (out / "thai-model-api.env").read_text()
    nginx = start_nginx(nginx_wrapper(tmp_path / "nginx", out / "thai-model-api.nginx"), [port])
    try:
        base = f"http://127.0.0.1:{port}"
        text = thai_text(40_000).encode()  # 120 KB: over 64 KiB, within the document limit
        r = httpx.post(base + "/v1/summarize/document", timeout=600,
                       files={"file": ("long.txt", text, "text/plain")}, data={"max_tokens": "8"})
        assert r.status_code == 200, r.text
        assert r.json()["document"]["characters"] >= 39_000
        r = httpx.post(base + "/v1/summarize/document", timeout=60,
                       files={"file": ("big.txt", b"a" * (limit + 1), "text/plain")})
        assert r.status_code == 413 and r.json()["error"]["param"] == "file"
        assert "THAI_DOCUMENT_MAX_BYTES" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/summarize", timeout=60, json={"text": "ก" * 30_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    finally:
        nginx.stop()


def test_a_later_piece_that_finds_the_queue_full_waits_and_retries(monkeypatch):
    from api.engine.errors import EngineOverloadedError

    monkeypatch.setattr(summarize_module, "OVERLOAD_RETRIES", 2)
    engine = FakeEngine(max_batch_size=1)  # one piece at a time: the 4th call is refused
    refusals = {"left": 2}
    generate = engine.generate

    def flaky(request):
        if len(engine.requests) == 3 and refusals["left"]:
            refusals["left"] -= 1
            raise EngineOverloadedError("queue full", retry_after=0)
        return generate(request)

    engine.generate = flaky
    client, _ = make_client(engine)
    with client:
        r = client.post("/v1/summarize", json={"text": thai_text(3000), "max_tokens": 20})
        assert r.status_code == 200 and refusals["left"] == 0
        refusals["left"] = 3  # more than the retries: the 429 reaches the client
        engine.requests.clear()
        r = client.post("/v1/summarize", json={"text": thai_text(3000), "max_tokens": 20})
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_overloaded"
    assert all(stream.closed for stream in engine.streams)
