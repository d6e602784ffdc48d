"""The UI's files without a browser: the summarize tab's document upload, long-text
progress, ``summarize_file``, and the batch tab (CSV/XLSX in, the same with a summary
column out), over the fake engine (tokens are characters, a reply is the user message
reversed), with a real upload folder and the real file-reading process."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from api.documents.pool import ParsePool
from api.serving import Serving
from api.settings import ModelSettings
from tests.documents_support import docx_bytes, html_bytes, markdown_bytes
from tests.fakes import FakeEngine
from thai_ui.batch import MAX_ROWS, SharedSlots, SlotLimitedEngine, batch_slots
from thai_ui.handlers import UIHandlers
from thai_ui.uploads import UploadStore

NEWS = ("ข่าววันนี้ฝนตกหนักในกรุงเทพมหานคร น้ำท่วมขังหลายพื้นที่ "
        "การจราจรติดขัดอย่างหนักในช่วงเย็น\n")


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def store(tmp_path) -> UploadStore:
    store = UploadStore(tmp_path / "uploads", quota_bytes=50_000_000, ttl_s=3600)
    store.dir.mkdir(parents=True)
    return store


@pytest.fixture(scope="module")
def parse_pool():
    """The app's sandboxed file readers, shared by this module's tests (spawning costs)."""
    pool = ParsePool(workers=2, timeout_s=60)
    yield pool
    pool.close()


@pytest.fixture
def make(store, parse_pool):
    """UIHandlers over a fake engine and the module's parse pool, closed after the test."""
    made: list[UIHandlers] = []

    def build(*, chunk_tokens: int = 1024, document_max_bytes: int | None = None,
              upload_max_bytes: int | None = None, **engine_kwargs) -> tuple[UIHandlers, FakeEngine]:
        engine = FakeEngine(**engine_kwargs)
        asyncio.run(engine.start())
        serving = Serving(engine, ModelSettings(max_new_tokens=50, summary_chunk_tokens=chunk_tokens),
                          document_max_bytes=document_max_bytes, parse_pool=parse_pool)
        handlers = UIHandlers(serving, uploads=store, upload_max_bytes=upload_max_bytes)
        made.append(handlers)
        return handlers, engine

    yield build
    for handlers in made:
        handlers.close()


def upload(store: UploadStore, name: str, data: bytes | str) -> str:
    """A file as Gradio leaves an upload: ``<upload folder>/<hash>/<name>``."""
    folder = store.dir / os.urandom(8).hex()
    folder.mkdir()
    path = folder / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def csv_bytes(header: list[str], rows: list[list]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def xlsx_bytes(header: list[str], rows: list[list]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def scanned_pdf() -> bytes:
    """One page that is only an image: no text layer."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (600, 800), "white")
    ImageDraw.Draw(image).rectangle((50, 50, 550, 120), fill="black")
    out = io.BytesIO()
    image.save(out, "PDF", resolution=72)
    return out.getvalue()


def session(name: str) -> SimpleNamespace:
    """A visitor's request: its session and (parse jobs are bounded per client) address."""
    return SimpleNamespace(session_hash=name, client=SimpleNamespace(host=f"visitor-{name}"))


async def collect(agen) -> list:
    return [item async for item in agen]


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------- documents
@pytest.mark.parametrize("name, data, kind", [
    ("ข่าว.txt", (NEWS * 3).encode("utf-8"), "TXT"),
    ("report.md", markdown_bytes(NEWS * 3), "MD"),
    ("page.html", html_bytes(NEWS * 3), "HTML"),
    ("รายงาน.docx", docx_bytes(NEWS * 3), "DOCX"),
])
def test_an_uploaded_document_fills_the_text_box_and_is_named(make, store, name, data, kind):
    handlers, engine = make()
    text, info = run(handlers.load_document(upload(store, name, data)))
    assert "ฝนตกหนักในกรุงเทพมหานคร" in text and "<p>" not in text
    assert f"**{name}**" in info and kind in info and "ตัวอักษร / characters" in info
    assert engine.requests == []  # reading is not summarizing


@pytest.mark.parametrize("name, data, thai, english", [
    ("scan.pdf", scanned_pdf(), "สแกน", "OCR is not supported"),
    ("tool.exe", b"MZ\x90\x00" + bytes(range(256)) * 4, "ไม่รองรับ", "not supported"),
    ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "ไม่รองรับ", "not supported"),
    ("fake.pdf", ("ข่าว " * 100).encode(), "นามสกุลไฟล์", "says one type"),
    ("empty.txt", b"", "ไม่พบข้อความ", "No text"),
    ("blank.txt", "   \n\u200b ".encode(), "ไม่พบข้อความ", "No text"),
])
def test_unreadable_documents_are_explained_in_thai_and_english(make, store, name, data, thai,
                                                                english):
    handlers, _ = make()
    with pytest.raises(gr.Error) as caught:
        run(handlers.load_document(upload(store, name, data)))
    assert thai in caught.value.message and english in caught.value.message, caught.value.message
    assert caught.value.title == "ข้อผิดพลาด / Error"


def test_files_over_the_document_limit_are_refused_before_parsing(make, store):
    handlers, _ = make(document_max_bytes=2048)
    with pytest.raises(gr.Error) as caught:
        run(handlers.load_document(upload(store, "big.txt", "ข" * 1000)))  # 3,000 bytes
    message = caught.value.message
    assert "ใหญ่เกิน" in message and "larger than this server accepts" in message
    assert "3,000 bytes" in message and "2,048" in message
    # the upload limit counts too: a file can never be larger than one upload
    small, _ = make(upload_max_bytes=1500)
    assert small.document_max_bytes == 1500
    with pytest.raises(gr.Error, match="1,500"):
        run(small.load_document(upload(store, "big.txt", "ข" * 1000)))


def test_too_many_pages_are_refused(make, store):
    handlers, _ = make()
    handlers.serving.document_max_pages = 1
    import docx

    document = docx.Document()
    for _ in range(3):
        document.add_paragraph(NEWS)
        document.add_page_break()
    out = io.BytesIO()
    document.save(out)
    path = upload(store, "long.docx", out.getvalue())
    # python-docx writes no page count (docProps/app.xml Pages), so this one reads fine ...
    text, _ = run(handlers.load_document(path))
    assert text.count("ฝนตกหนัก") == 3
    # ... while a PDF's pages are counted
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(3):
        writer.add_blank_page(200, 200)
    pdf = io.BytesIO()
    writer.write(pdf)
    with pytest.raises(gr.Error) as caught:
        run(handlers.load_document(upload(store, "pages.pdf", pdf.getvalue())))
    assert "จำนวนหน้า" in caught.value.message and "limit of 1 pages" in caught.value.message


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "upload/../../etc/passwd",
                                  "relative.txt", "", None, {"path": "/etc/passwd"}])
def test_only_files_in_the_upload_folder_are_read(make, path):
    handlers, _ = make()
    for call in (lambda: handlers.load_document(path), lambda: handlers.batch_columns(path),
                 lambda: collect(handlers.summarize_file(path, 20, 0.0)),
                 lambda: collect(handlers.run_batch(path, "text", 20, 0.0, session("s")))):
        with pytest.raises(gr.Error) as caught:
            run(call())
        assert "กรุณาเลือกไฟล์" in caught.value.message and "choose a file" in caught.value.message
        assert "root:" not in caught.value.message


def test_a_link_out_of_the_upload_folder_is_not_followed(make, store):
    handlers, _ = make()
    link = Path(upload(store, "x.txt", "x")).with_name("link.txt")
    link.symlink_to("/etc/passwd")
    with pytest.raises(gr.Error, match="choose a file"):
        run(handlers.load_document(str(link)))


def test_a_document_longer_than_a_request_is_refused(make, store):
    handlers, _ = make()
    with pytest.raises(gr.Error) as caught:
        run(handlers.load_document(upload(store, "huge.txt", "ก" * 200_001)))
    assert "แบ่งเอกสาร" in caught.value.message and "200,001 characters" in caught.value.message


# ------------------------------------------------------------ long texts
def test_a_long_text_shows_rounds_and_chunks_then_streams_the_summary(make):
    handlers, engine = make(chunk_tokens=64, max_batch_size=4)
    text = NEWS * 12  # about 1,000 characters (tokens, for the fake engine): pieces of 64
    updates = run(collect(handlers.summarize(text, 30, 0.0)))
    lines = [line for _, line in updates]
    progress = [line for line in lines if line.startswith(("ข้อความยาว", "รวมสรุป"))]
    assert progress, lines
    assert any("ส่วนที่เสร็จ 1 จาก" in line and "1 of" in line and "chunks done" in line
               and "tokens written" in line and "รอบที่ 1 / round 1" in line for line in progress)
    assert all(summary == "" for summary, line in updates if line.startswith(("ข้อความยาว", "รวมสรุป")))
    streamed = [summary for summary, line in updates if line.startswith("กำลังสรุป")]
    assert len(streamed) >= 2 and all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))
    final_summary, final_line = updates[-1]
    assert final_summary and final_summary.startswith(streamed[-1])
    assert final_line.startswith("เสร็จ / done") and "chunks in" in final_line and "รอบ" in final_line
    assert len(engine.requests) > 2


def test_a_short_text_is_one_call_without_progress_lines(make):
    handlers, engine = make()
    updates = run(collect(handlers.summarize("ข่าววันนี้ฝนตกหนัก", 5, 0.0)))
    assert len(engine.requests) == 1 and len(updates) == 5
    assert not any("chunk" in line for _, line in updates)


def test_summarize_file_streams_a_documents_summary(make, store):
    handlers, engine = make()
    path = upload(store, "ข่าว.docx", docx_bytes(NEWS))
    updates = run(collect(handlers.summarize_file(path, 8, 0.0)))
    summary, line = updates[-1]
    assert summary and line.startswith("เสร็จ / done") and "**ข่าว.docx**" in line and "DOCX" in line
    assert len(engine.requests) == 1 and len(updates) >= 2


# ------------------------------------------------------------------ batch
def test_batch_columns_default_as_the_command_line_picks(make, store):
    handlers, _ = make()
    update, info = run(handlers.batch_columns(upload(store, "a.csv", csv_bytes(
        ["id", "Text", "note"], [[1, "ข่าว", "x"], [2, "ข่าว", "y"], ["", "", ""]]))))
    assert update["choices"] == ["id", "Text", "note"] and update["value"] == "Text"
    assert "แถว / rows: **2**" in info and "CSV" in info
    update, info = run(handlers.batch_columns(upload(store, "one.xlsx", xlsx_bytes(
        ["ข้อความ"], [["ข่าว"]]))))
    assert update["choices"] == ["ข้อความ"] and update["value"] == "ข้อความ" and "XLSX" in info
    update, info = run(handlers.batch_columns(upload(store, "two.csv", csv_bytes(
        ["body", "source"], [["ข่าว", "x"]]))))
    assert update["value"] is None and "choose the text column" in info


@pytest.mark.parametrize("name, data, thai, english", [
    ("notes.txt", b"text\nhello\n", ".csv", ".xlsx"),
    ("latin1.csv", "text\nd\xe9j\xe0\n".encode("latin-1") + b"\xff\xfe", "UTF-8", "UTF-8"),
    ("broken.xlsx", b"PK\x03\x04 not a zip", "อ่านไฟล์ตาราง", "could not be read"),
    ("empty.csv", b"", "อ่านไฟล์ตาราง", "empty"),
])
def test_bad_tables_are_explained_in_thai_and_english(make, store, name, data, thai, english):
    handlers, _ = make()
    with pytest.raises(gr.Error) as caught:
        run(handlers.batch_columns(upload(store, name, data)))
    assert thai in caught.value.message and english in caught.value.message, caught.value.message


def test_an_xlsx_that_unpacks_too_far_is_refused_before_it_is_read(make, store):
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("xl/worksheets/sheet1.xml", b"<row/>" * 12_000_000)  # 72 MB of rows
    assert len(out.getvalue()) < 1_000_000
    handlers, _ = make()
    with pytest.raises(gr.Error) as caught:
        run(handlers.batch_columns(upload(store, "bomb.xlsx", out.getvalue())))
    assert "ซับซ้อน" in caught.value.message and "unpacks to" in caught.value.message


def _run_batch(handlers, path, column="text", name="s1", max_tokens=20):
    return run(collect(handlers.run_batch(path, column, max_tokens, 0.0, session(name))))


@pytest.mark.parametrize("fmt", ["csv", "xlsx"])
def test_a_batch_writes_the_same_kind_of_file_with_a_summary_column(make, store, fmt):
    handlers, engine = make(max_batch_size=4, delay=0.002)
    rows = [[f"id-{i}", f"ข่าวที่ {i} " + "ฝนตก" * i] for i in range(1, 9)]
    rows.insert(3, ["id-bad", ""])  # an empty text: that row's error, the others go on
    header = ["id", "text"]
    data = csv_bytes(header, rows) if fmt == "csv" else xlsx_bytes(header, rows)
    updates = _run_batch(handlers, upload(store, f"ข่าว.{fmt}", data))
    states = [html.split('data-state="')[1].split('"')[0] for html, _ in updates]
    assert states[0] == "reading" and states[-1] == "done"
    assert all(file is None for _, file in updates[:-1])
    final_html, result = updates[-1]
    assert "rows done: <b>9</b> / 9" in final_html and "errors: <b>1</b>" in final_html
    result_path = Path(result)
    assert result_path.name == f"ข่าว-summaries.{fmt}"
    assert store.resolve(str(result_path)) == result_path.resolve(), "outside the upload folder"
    assert store.token_for(str(result_path)).startswith("upload/")
    assert list(result_path.parent.iterdir()) == [result_path]  # no sidecar left behind
    from api.batch.formats import read_records

    records = list(read_records(result_path))
    assert records[0] == ["row", "id", "text", "summary", "error"]
    body = [(r + [None] * 5)[:5] for r in records[1:]]  # a workbook drops empty trailing cells
    assert [r[1] for r in body] == [r[0] for r in rows]  # the input's order
    for record in body:
        if record[1] == "id-bad":
            assert not record[3] and "400" in str(record[4])
        else:
            # the fake engine's summary is its prompt reversed: the text is in it
            assert str(record[2])[::-1][:5] in str(record[3]) and not record[4]
    assert len(engine.requests) == 8


def test_rows_are_limited(make, store):
    handlers, engine = make()
    path = upload(store, "many.csv", csv_bytes(["text"], [[f"ข่าว {i}"] for i in range(MAX_ROWS + 1)]))
    update, info = run(handlers.batch_columns(path))
    assert f"more than {MAX_ROWS:,}" in info
    with pytest.raises(gr.Error) as caught:
        _run_batch(handlers, path)
    message = caught.value.message
    assert "แถวเกินขีดจำกัด" in message and f"more than {MAX_ROWS:,} rows" in message
    assert engine.requests == []


def test_a_column_must_be_chosen_and_exist(make, store):
    handlers, _ = make()
    path = upload(store, "two.csv", csv_bytes(["body", "source"], [["ข่าว", "x"]]))
    with pytest.raises(gr.Error, match="choose the column"):
        _run_batch(handlers, path, column=None)
    with pytest.raises(gr.Error) as caught:
        _run_batch(handlers, path, column="nope")
    assert "ไม่มีคอลัมน์" in caught.value.message and "'nope'" in caught.value.message


def test_the_result_respects_the_upload_quota(make, store):
    handlers, engine = make()
    store.quota_bytes = 5000
    path = upload(store, "a.csv", csv_bytes(["text"], [["ข่าว"]] * 20))
    with pytest.raises(gr.Error) as caught:
        _run_batch(handlers, path)
    assert "พื้นที่เก็บไฟล์" in caught.value.message and "storage is full" in caught.value.message
    assert engine.requests == []


async def _until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_one_batch_per_session_and_stop_keeps_the_finished_rows(make, store):
    handlers, engine = make(max_batch_size=2, delay=0.01)
    path = upload(store, "a.csv", csv_bytes(["text"], [[f"ข่าวที่ {i} ฝนตกหนัก"] for i in range(30)]))

    async def scenario():
        first = asyncio.ensure_future(collect(handlers.run_batch(path, "text", 20, 0.0, session("A"))))
        await _until(lambda: handlers.batches.get("A") is not None
                     and handlers.batches.get("A").done >= 2)
        with pytest.raises(gr.Error) as busy:
            await collect(handlers.run_batch(path, "text", 20, 0.0, session("A")))
        assert "กำลังสรุปไฟล์อื่น" in busy.value.message and "already running" in busy.value.message
        handlers.stop_batch(session("B"))  # another session's stop does nothing here
        assert handlers.batches.get("A").running
        handlers.stop_batch(session("A"))
        return await first

    updates = run(scenario())
    final_html, result = updates[-1]
    assert 'data-state="stopped"' in final_html and "finished rows" in final_html
    done = int(final_html.split("rows done: <b>")[1].split("<")[0])
    assert 2 <= done < 30
    from api.batch.formats import read_records

    assert len(list(read_records(Path(result)))) == done + 1
    assert engine.running == 0 and all(s.closed for s in engine.streams)
    assert handlers.batches.running() == 0


def test_leaving_the_page_cancels_the_batch(make, store):
    handlers, engine = make(max_batch_size=2, delay=0.01)
    path = upload(store, "a.csv", csv_bytes(["text"], [[f"ข่าวที่ {i} ฝนตกหนัก"] for i in range(30)]))

    async def scenario():
        task = asyncio.ensure_future(collect(handlers.run_batch(path, "text", 20, 0.0, session("A"))))
        await _until(lambda: engine.running > 0)
        handlers.end_session(session("A"))  # Gradio's unload event
        updates = await asyncio.wait_for(task, 10)
        assert engine.running == 0 and engine.cancelled >= 1
        return updates

    updates = run(scenario())
    assert 'data-state="stopped"' in updates[-1][0]


def test_too_many_batches_at_once_are_refused(make, store):
    handlers, _ = make(delay=0.05)
    handlers.batches.max_running = 2
    path = upload(store, "a.csv", csv_bytes(["text"], [["ข่าวที่ฝนตกหนัก"]] * 10))

    def visitor(name: str) -> SimpleNamespace:  # each session from its own address
        return SimpleNamespace(session_hash=name, client=SimpleNamespace(host=f"10.0.0.{name}"))

    async def scenario():
        tasks = [asyncio.ensure_future(collect(handlers.run_batch(path, "text", 20, 0.0, visitor(s))))
                 for s in ("A", "B")]
        await _until(lambda: handlers.batches.running() == 2)
        with pytest.raises(gr.Error, match="busy"):
            await collect(handlers.run_batch(path, "text", 20, 0.0, visitor("C")))
        for s in ("A", "B"):
            handlers.stop_batch(session(s))
        await asyncio.gather(*tasks)

    run(scenario())


def test_batches_use_at_most_half_the_engines_batch_long_rows_included(make, store):
    handlers, engine = make(chunk_tokens=64, max_batch_size=4, delay=0.002)
    assert batch_slots(4) == 2 and batch_slots(1) == 1 and batch_slots(None) == 1
    long_row = (NEWS * 4).strip()  # several pieces each
    path = upload(store, "a.csv", csv_bytes(["text"], [[long_row]] * 4))
    updates = _run_batch(handlers, path)
    assert 'data-state="done"' in updates[-1][0] and "errors: <b>0</b>" in updates[-1][0]
    assert len(engine.requests) > 8 and engine.max_running == 2


def test_slot_limited_streams_give_their_slot_back_however_they_end():
    engine = FakeEngine(max_batch_size=2)
    asyncio.run(engine.start())
    slots = SharedSlots(1)
    limited = SlotLimitedEngine(engine, slots)

    async def scenario():
        from api.engine import GenerationRequest, SamplingParams

        def request(n=5):
            return GenerationRequest(prompt_ids=[ord(c) for c in "<user>สวัสดี"],
                                     params=SamplingParams(max_tokens=n), request_id="r")

        first = limited.generate(request())
        await first.wait_open()
        second = limited.generate(request())
        waiting = asyncio.ensure_future(second.wait_open())
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(engine.requests) == 1  # admitted only with a slot
        await first.aclose()  # closed early: its slot is free
        await asyncio.wait_for(waiting, 1)
        assert [c async for c in second][-1].finished  # read to the end: free again
        third = limited.generate(request())
        await asyncio.wait_for(third.wait_open(), 1)
        await third.aclose()
        too_long = limited.generate(request(n=10**6))
        with pytest.raises(Exception):
            await too_long.wait_open()  # an admission error frees the slot too
        fourth = limited.generate(request())
        await asyncio.wait_for(fourth.wait_open(), 1)
        await fourth.aclose()
        assert limited.info is engine.info and limited.ready

    asyncio.run(scenario())


# ------------------------------------------------------------------ guard
def test_a_function_published_by_name_must_be_listed_in_the_guard():
    from thai_ui.guard import PUBLIC_API, FunctionPolicy

    assert PUBLIC_API == {"summarize", "summarize_file", "chat"}
    with gr.Blocks() as blocks:
        box = gr.Textbox()
        gr.Button().click(lambda x: x, inputs=[box], outputs=[box], api_name="summarize")
        gr.Button().click(lambda x: x, inputs=[box], outputs=[box], api_name="helper",
                          api_visibility="private")
    assert FunctionPolicy(blocks).public_names == {"summarize"}
    with gr.Blocks() as leaky:
        box = gr.Textbox()
        gr.Button().click(lambda x: x, inputs=[box], outputs=[box], api_name="read_any_file")
    with pytest.raises(RuntimeError, match="read_any_file"):
        FunctionPolicy(leaky)


def test_the_counter_says_a_long_text_is_summarized_in_chunks_not_too_long(make):
    handlers, _ = make(chunk_tokens=64, max_context=1000)
    short = handlers.text_stats("ข่าววันนี้ฝนตกหนัก", 100)
    assert not short.chunked and "chunks" not in short.markdown()
    over_a_chunk = handlers.text_stats(NEWS * 2, 100)
    assert over_a_chunk.chunked and not over_a_chunk.over_limit
    assert "summarized in chunks" in over_a_chunk.markdown()
    past_the_window = handlers.text_stats(NEWS * 20, 100)
    assert past_the_window.over_limit and past_the_window.chunked
    assert "too long" not in past_the_window.markdown()


def test_a_batch_waits_for_the_model(make, store):
    handlers, engine = make(ready=False)
    path = upload(store, "a.csv", csv_bytes(["text"], [["ข่าว"]]))
    with pytest.raises(gr.Error) as caught:
        _run_batch(handlers, path)
    assert "ยังโหลดไม่เสร็จ" in caught.value.message and "still loading" in caught.value.message
    assert handlers.batches.running() == 0
    ready, _ = make()
    with pytest.raises(gr.Error, match="above this server's limit"):
        _run_batch(ready, path, max_tokens=10**6)


def test_the_page_wires_files_batch_and_unload_privately():
    """What the mounted Blocks register: the file and batch events by index only, the
    unload event that cancels a closed page's batch, and summarize_file by name."""
    from starlette.routing import Mount

    from api.server import create_app
    from api.settings import Settings

    app = create_app(Settings.from_overrides({}), FakeEngine())
    mount = next(r for r in app.router.routes if isinstance(r, Mount) and r.path == "/ui")
    blocks = mount.app.app.get_blocks()
    fns = {fn.api_name: fn for fn in blocks.fns.values()}
    for name in ("load_document", "batch_columns", "run_batch", "stop_batch", "end_session"):
        assert fns[name].api_visibility == "private", name
    assert [t[1] for t in fns["end_session"].targets] == ["unload"]
    assert fns["summarize_file"].api_visibility == "public"
    assert mount.app.functions.public_names == {"summarize", "summarize_file", "chat"}


def wait_for_file(path: str) -> str:
    """A parse job that holds its reader until ``path`` exists (at most a minute)."""
    import time

    for _ in range(1200):
        if os.path.exists(path):
            return "released"
        time.sleep(0.05)
    return "timed out"


def test_one_visitor_has_one_file_read_at_a_time(make, store, tmp_path):
    """Parse jobs are bounded per client (THAI_PARSE_JOBS_PER_CLIENT=1), by address, not by
    session (a client invents those): while one of a visitor's files is being read, a second
    from another of its tabs is refused as busy, and another visitor's is read."""
    from thai_ui.handlers import _client_of

    handlers, _ = make()
    path = upload(store, "news.txt", "ข่าววันนี้ฝนตกหนัก")
    release = tmp_path / "release"
    reading = handlers.files.pool.submit(_client_of(session("A")), wait_for_file, str(release))
    try:
        other_tab = SimpleNamespace(session_hash="other-tab", client=session("A").client)
        with pytest.raises(gr.Error, match="busy"):
            run(handlers.load_document(path, other_tab))
        assert run(handlers.load_document(path, session("B")))[0] == "ข่าววันนี้ฝนตกหนัก"
    finally:
        release.touch()
    assert reading.result(timeout=120) == "released"
    assert run(handlers.load_document(path, session("A")))[0] == "ข่าววันนี้ฝนตกหนัก"
