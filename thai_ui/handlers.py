"""What the UI's buttons do: in-process calls into the serving layer and engine.

The UI never calls the HTTP API of its own server: it builds the same request
schemas as the routes (so validation is identical) and iterates what ``Serving``
returns, yielding every step to Gradio as it arrives. A summary is a
:class:`~api.serving.SummaryRun`: a long text's progress (round, chunks done),
then the final summary's text as it is generated. The engine batches these
requests together with API traffic; leaving the stream early (stop button,
closed tab) cancels the generations.

Files (the summarize tab's document, the batch tab's table) are read only from
the UI's upload folder and parsed in a separate process (:mod:`thai_ui.documents`);
batches are bounded per session, per client, in rows and in engine slots (:mod:`thai_ui.batch`),
and their result files are written into the upload folder, where the guard serves
them and the sweeper removes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import gradio as gr

from api.batch import run_batch
from api.engine import GenerationChunk, GenerationRequest
from api.engine.tenants import key_tenant, ui_tenant
from api.protocol import ChatCompletionRequest
from api.protocol_summarize import SummarizeProgress, SummarizeRequest, SummarizeResponse
from api.security import client_identity
from api.serving import Serving, SummaryOptions
from api.text import is_blank
from thai_ui.batch import (
    MAX_ROWS,
    BatchBusy,
    BatchJob,
    BatchJobs,
    SharedSlots,
    SlotLimitedEngine,
    batch_slots,
    progress_html,
)
from thai_ui.chat_history import build_messages
from thai_ui.documents import (
    DocumentText,
    FileJobError,
    FileWorker,
    extract_job,
    read_table_job,
    table_info_job,
    write_results_job,
)
from thai_ui.messages import error_for, file_error, ui_error
from thai_ui.status import status_html, status_is_final
from thai_ui.text_stats import TextCounter, TextStats
from thai_ui.uploads import UploadStore

log = logging.getLogger("thai.ui")
PROGRESS_INTERVAL_S = 0.25  # the batch tab's progress: at most four updates a second
UI_BATCH_TENANT = ui_tenant("batch")  # the batch tab's rows: one UI tenant, in its shared slots

# The longest text /v1/summarize accepts; the UI's counters stop there too.
MAX_TEXT_CHARS: int = next(m.max_length for m in SummarizeRequest.model_fields["text"].metadata
                           if getattr(m, "max_length", None))


class UIHandlers:
    """Bound methods used as Gradio event handlers."""

    def __init__(self, serving: Serving, *, uploads: UploadStore | None = None,
                 upload_max_bytes: int | None = None, batch_jobs_per_client: int = 1):
        self.serving = serving
        self.uploads = uploads  # files are read only from here
        self.upload_max_bytes = upload_max_bytes  # what one upload may be (the body limit)
        self.counter = TextCounter()
        self.files = FileWorker(serving.parse_pool)  # the app's, shared with the API
        self.batches = BatchJobs(per_client=batch_jobs_per_client)
        self.batch_slots = SharedSlots(lambda: batch_slots(self.engine.info.max_batch_size))
        self._batch_serving: Serving | None = None
        self._template: int | None = None

    def close(self) -> None:
        self.counter.close()
        self.files.close()

    @property
    def engine(self):
        return self.serving.engine

    # ------------------------------------------------------------- status
    def status(self) -> tuple[str, bool]:
        """Banner HTML and whether polling may stop."""
        return status_html(self.engine), status_is_final(self.engine)

    # ------------------------------------------------------------- models
    def model_names(self) -> list[str]:
        """The names a request's ``model`` may give (what /v1/models lists), served model
        first: the engine says, whichever engine runs."""
        try:
            return [m.name for m in self.engine.served_models()] or [self.serving.model_name]
        except Exception:  # the model went away
            return [self.serving.model_name]

    def model_picker(self, current: Any = None) -> dict:
        """The picker's update: the served names, shown only when there is a choice; the
        visitor's pick is kept while it is still served."""
        names = self.model_names()
        value = current if isinstance(current, str) and current in names else names[0]
        return gr.update(choices=names, value=value, visible=len(names) > 1)

    def chosen_model(self, model: Any) -> str:
        """The picker's value, checked here: a visitor may post anything to a Gradio function,
        and a name the engine does not serve is a clear error, never a 500. (Handlers take it
        after ``request``: Gradio inserts the request by position, the pick follows it, and
        callers that pass the request positionally keep working.)"""
        if model is None or model == "":
            return self.serving.model_name
        if isinstance(model, str) and len(model) <= 256 and self.engine.serves(model):
            return model
        raise ui_error("model_not_found", "served: " + ", ".join(self.model_names()))

    # -------------------------------------------------------------- stats
    def text_stats(self, text: str | None, max_tokens: float | None) -> TextStats:
        """Counts for the summarize box; texts longer than a request may be are not counted.

        Word segmentation costs about a second per 200,000 characters and grows
        faster than linearly beyond, and this runs on every edit of a public
        page: the bound keeps an anonymous caller's cost at what a real request
        could cost. Events of this handler run one at a time (app.py), and long
        texts are counted in another process (:class:`TextCounter`).
        """
        text = text if isinstance(text, str) else ""
        if len(text) > MAX_TEXT_CHARS:
            return TextStats(graphemes=0, words=0, tokens=None, token_limit=None,
                             too_long=len(text), max_chars=MAX_TEXT_CHARS)
        tokens = limit = None
        chunked = False
        if self.engine.ready:
            requested = max_tokens if isinstance(max_tokens, (int, float)) and 0 < max_tokens < 1e9 \
                else self.serving.settings.max_new_tokens
            limit = self.engine.info.max_context - int(requested)
            try:
                tokens = 0 if is_blank(text) else len(
                    self.engine.encode_chat(self.serving.summary_messages(text)))
                # what the serving layer splits: past the window, or past a chunk's tokens
                chunked = tokens > limit or \
                    tokens - self._template_tokens() > self.serving.settings.summary_chunk_tokens
            except Exception:  # the model went away between the check and the call
                tokens = limit = None
                chunked = False
        graphemes, words = self.counter.count(text)
        return TextStats(graphemes=graphemes, words=words, tokens=tokens, token_limit=limit,
                         chunked=chunked)

    def _template_tokens(self) -> int:
        """Tokens of the summary prompt around the text (about: one letter of text included)."""
        if self._template is None:
            self._template = len(self.engine.encode_chat(self.serving.summary_messages("ก"))) - 1
        return self._template

    def stats_markdown(self, text: str | None, max_tokens: float | None) -> str:
        return self.text_stats(text, max_tokens).markdown()

    # ---------------------------------------------------------- summarize
    async def summarize(self, text: str | None, max_tokens: float, temperature: float,
                        request: gr.Request = None, model: Any = None) -> AsyncIterator[tuple[str, str]]:
        """Stream (summary so far, status line) pairs.

        A long text is summarized in pieces by the serving layer: while its pieces run, the
        status line says which round, how many pieces are done and the tokens written (one
        update per progress event, none skipped); then the final summary streams in as before.
        """
        started = time.perf_counter()
        if text is None or is_blank(text):
            raise ui_error("empty_text")
        model = self.chosen_model(model)
        async with aclosing(self._summary_updates(text, max_tokens, temperature, started,
                                                  tenant=tenant_of(request),
                                                  model=model)) as updates:
            async for update in updates:
                yield update

    async def _summary_updates(self, text: str, max_tokens: float, temperature: float,
                               started: float, suffix: str = "", *, tenant: str,
                               model: str | None = None) -> AsyncIterator[tuple[str, str]]:
        try:
            request = SummarizeRequest(text=text, max_tokens=int(max_tokens),
                                       temperature=float(temperature), model=model)
            run = await self.serving.summarize_events(request, tenant)
        except Exception as exc:
            raise error_for(exc) from None
        parts: list[str] = []
        round_ = 1
        pending: tuple[str, str] | None = None  # each delta is shown when the next arrives,
        try:  # so the last text arrives with the final line, in one update
            async for event in run:
                seconds = time.perf_counter() - started
                if isinstance(event, SummarizeResponse):
                    yield event.summary.strip(), _done_line(event, seconds) + suffix
                    return
                if isinstance(event, SummarizeProgress):
                    round_ = event.round
                    if not event.final:
                        yield "", _progress_line(event, seconds) + suffix
                    elif event.round > 1:
                        yield "", _combining_line(event.round, seconds) + suffix
                    continue
                parts.append(event.delta)
                if pending is not None:
                    yield pending
                pending = ("".join(parts).strip(), _streaming_line(round_, seconds) + suffix)
        except Exception as exc:
            raise error_for(exc) from None
        finally:
            await run.aclose()

    # ---------------------------------------------------------- documents
    async def load_document(self, path: str | None, request: gr.Request = None) -> tuple[str, str]:
        """The summarize tab's file: its text for the (editable) text box, and a line
        naming the document (name, kind, pages, characters)."""
        document = await self._read_document(path, _client_of(request))
        return document.text, document_markdown(document)

    async def summarize_file(self, path: str | None, max_tokens: float, temperature: float,
                             request: gr.Request = None, model: Any = None
                             ) -> AsyncIterator[tuple[str, str]]:
        """For ``gradio_client``: a document's summary, streamed like :meth:`summarize`."""
        started = time.perf_counter()
        model = self.chosen_model(model)
        document = await self._read_document(path, _client_of(request))
        suffix = " · " + document_markdown(document)
        async with aclosing(self._summary_updates(document.text, max_tokens, temperature,
                                                  started, suffix, tenant=tenant_of(request),
                                                  model=model)) as updates:
            async for update in updates:
                yield update

    def _uploaded(self, path: Any) -> Path:
        """The upload ``path`` names, only inside this process's upload folder."""
        if isinstance(path, dict):  # FileData, from a caller that skipped preprocessing
            path = path.get("path")
        if not path:
            raise ui_error("no_file")
        resolved = self.uploads.resolve(str(path)) if self.uploads is not None else None
        if resolved is None:
            raise ui_error("no_file")
        return resolved

    async def _read_document(self, path: Any, client: str = "-") -> DocumentText:
        resolved = self._uploaded(path)
        try:
            document = await self.files.run(extract_job, str(resolved), resolved.name,
                                            self.document_max_bytes,
                                            self.serving.document_max_pages,
                                            0.8 * self.files.pool.timeout_s, client=client)
        except FileJobError as exc:
            raise file_error(exc.code, exc.message) from None
        if is_blank(document.text):
            raise ui_error("document_empty")
        if len(document.text) > MAX_TEXT_CHARS:
            raise ui_error("document_text_too_long", f"{len(document.text):,} characters; "
                           f"at most {MAX_TEXT_CHARS:,}")
        return document

    @property
    def document_max_bytes(self) -> int:
        """The most bytes of a file: the serving layer's limit, within what an upload may be."""
        limit = self.serving.document_max_bytes
        return min(limit, self.upload_max_bytes) if self.upload_max_bytes else limit

    # -------------------------------------------------------------- batch
    async def batch_columns(self, path: Any, request: gr.Request = None) -> tuple[Any, str]:
        """On upload of a table: the text column's choices (the command line's pick
        selected) and a line with the rows and columns."""
        resolved = self._uploaded(path)
        try:
            info = await self.files.run(table_info_job, str(resolved), resolved.name,
                                        self.document_max_bytes, MAX_ROWS,
                                        client=_client_of(request))
        except FileJobError as exc:
            raise file_error(exc.code, exc.message) from None
        rows = (f"มากกว่า / more than {MAX_ROWS:,} ⚠ (สูงสุด / at most {MAX_ROWS:,})"
                if info.rows > MAX_ROWS else f"{info.rows:,}")
        line = (f"**{html.escape(resolved.name)}** · {info.format.upper()} · แถว / rows: **{rows}** · "
                f"คอลัมน์ / columns: {len(info.columns)}")
        if info.default_column is None:
            line += " · ⚠ เลือกคอลัมน์ข้อความ / choose the text column"
        return gr.update(choices=info.columns, value=info.default_column), line

    async def run_batch(self, path: Any, column: str | None, max_tokens: float,
                        temperature: float, request: gr.Request = None, model: Any = None
                        ) -> AsyncIterator[tuple[str, Any]]:
        """Stream (progress HTML, result file) while the table's rows are summarized."""
        session, client = _session_of(request), _client_of(request)
        model = self.chosen_model(model)
        resolved = self._uploaded(path)
        if not column:
            raise ui_error("choose_column")
        try:
            job = self.batches.start(session, client)
        except BatchBusy as busy:
            code = {"session": "batch_running", "client": "batch_client_busy"}.get(
                busy.scope, "server_overloaded")
            raise ui_error(code) from None
        try:
            async with aclosing(self._batch_updates(job, resolved, str(column), max_tokens,
                                                    temperature, model)) as updates:
                async for update in updates:
                    yield update
        finally:
            job.stop()  # a closed page or a failure: cancel the rows in flight
            if job.task is not None:
                await asyncio.wait({job.task})
            self.batches.finish(job)

    async def _batch_updates(self, job: BatchJob, path: Path, column: str, max_tokens: float,
                             temperature: float, model: str | None = None
                             ) -> AsyncIterator[tuple[str, Any]]:
        if not self.engine.ready:  # every row would fail the same way
            failure = self.engine.failure()
            raise ui_error("model_load_failed" if failure else "model_not_ready")
        try:
            options = SummaryOptions(max_tokens=int(max_tokens), temperature=float(temperature),
                                     model=model)
            self.serving.summary_params(options)  # a bad length fails once, not on every row
        except Exception as exc:
            raise error_for(exc) from None
        yield progress_html("reading"), None
        try:
            table, rows, fmt = await self.files.run(
                read_table_job, str(path), path.name, column, self.document_max_bytes, MAX_ROWS,
                options.max_tokens, options.temperature, options.model, client=job.client)
        except FileJobError as exc:
            raise file_error(exc.code, exc.message) from None
        if job.stopped:
            yield progress_html("stopped"), None
            return
        expected = 2 * path.stat().st_size + len(rows) * (options.max_tokens * 16 + 1024)
        full = self.uploads.room_for(job.client, expected) if self.uploads is not None else "server"
        if full is not None:  # the result file counts in the client's share, like an upload
            raise ui_error("client_upload_quota_exceeded" if full == "client"
                           else "upload_quota_exceeded")
        job.total = len(rows)
        concurrency = batch_slots(self.engine.info.max_batch_size)
        job.task = asyncio.ensure_future(run_batch(
            self.batch_serving, rows, job, concurrency, job.progress, total=len(rows)))
        yield progress_html("running", done=0, total=job.total, seconds=job.elapsed), None
        last = time.monotonic()
        while not job.task.done():
            job.changed.clear()
            try:
                await asyncio.wait_for(job.changed.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            # At most four updates a second, but a finished row is never skipped: a change
            # inside the interval is shown when it ends (it was dropped, and rows finishing
            # close together left the bar at 0 until the end).
            pause = PROGRESS_INTERVAL_S - (time.monotonic() - last)
            if pause > 0 and not job.task.done():
                await asyncio.sleep(pause)
            if job.task.done():
                break
            last = time.monotonic()
            yield progress_html("running", done=job.done, total=job.total, errors=job.errors,
                                seconds=job.elapsed, finished=job.finished_rows()), None
        failure = None
        if not job.task.cancelled() and job.task.exception() is not None:
            failure = job.task.exception()
            log.warning("UI batch ended early: %r", failure)
        state = "failed" if failure is not None else "stopped" if job.stopped else "done"
        result = None
        note = ""
        if job.results:
            result = self._result_path(path, fmt)
            try:
                # the server's own output, not the visitor's file: not refused for the
                # visitor's other jobs (its results would be lost)
                await self.files.run(write_results_job, table, _portable(job.results), fmt,
                                     str(result), client=f"{job.client} results")
            except FileJobError as exc:
                raise file_error(exc.code, exc.message) from None
            self.uploads.record(job.client, result)
            note = ("ไฟล์ผลลัพธ์มีเฉพาะแถวที่เสร็จแล้ว / the result file holds the finished rows"
                    if state != "done" else "")
        if state == "failed":
            note = ("ระบบประมวลผลหยุดทำงาน / the engine stopped. " + note).strip()
        yield progress_html(state, done=job.done, total=job.total, errors=job.errors,
                            seconds=job.elapsed, note=note, finished=job.finished_rows()), \
            (str(result) if result is not None else None)

    def _result_path(self, source: Path, fmt: str) -> Path:
        """A new file in the upload folder (the guard serves it, the sweeper removes it)."""
        assert self.uploads is not None
        folder = self.uploads.dir / uuid.uuid4().hex
        folder.mkdir(mode=0o700)
        stem = source.stem[:80] or "batch"
        return folder / f"{stem}-summaries.{fmt}"

    def stop_batch(self, request: gr.Request = None) -> None:
        """The stop button: cancel this session's batch (finished rows are still written)."""
        self.batches.stop(_session_of(request))

    def end_session(self, request: gr.Request = None) -> None:
        """The page was closed (Gradio's unload): cancel its batch."""
        self.batches.stop(_session_of(request))

    @property
    def batch_serving(self) -> Serving:
        """The serving layer on the engine's shared UI batch slots (built once)."""
        if self._batch_serving is None:
            engine = SlotLimitedEngine(self.engine, self.batch_slots)
            self._batch_serving = Serving(engine, self.serving.settings,
                                          document_max_bytes=self.serving.document_max_bytes,
                                          document_max_pages=self.serving.document_max_pages)
            self._batch_serving.default_tenant = UI_BATCH_TENANT  # within the UI's share
        return self._batch_serving

    # --------------------------------------------------------------- chat
    async def chat(self, message: Any, history: list[Any] | None, system_prompt: str | None,
                   max_tokens: float, temperature: float, request: gr.Request = None,
                   model: Any = None) -> AsyncIterator[str]:
        """Stream the assistant's reply (the text so far, as ChatInterface expects)."""
        messages = build_messages(message, history, system_prompt)
        if is_blank(messages[-1]["content"]):
            raise ui_error("empty_message")
        model = self.chosen_model(model)
        try:
            # The seed's defaults for people: no repeated 3-grams (the OpenAI route's
            # default is plain decoding).
            body = ChatCompletionRequest(
                model=model, messages=messages, max_tokens=int(max_tokens),
                temperature=float(temperature),
                no_repeat_ngram_size=self.serving.settings.no_repeat_ngram_size)
            generation = await self.serving.chat_request(body, tenant_of(request))
        except Exception as exc:
            raise error_for(exc) from None
        async with aclosing(self._stream(generation)) as chunks:
            async for reply, _ in chunks:
                yield reply.lstrip()

    async def _stream(self, generation: GenerationRequest) -> AsyncIterator[tuple[str, GenerationChunk]]:
        """(text so far, latest chunk) for every chunk that adds text or finishes."""
        try:
            stream = self.engine.generate(generation)  # admission errors raise here
        except Exception as exc:
            raise error_for(exc) from None
        parts: list[str] = []
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                if chunk.text or chunk.finished:
                    yield "".join(parts), chunk
        except Exception as exc:
            raise error_for(exc) from None
        finally:
            await stream.aclose()


def _took(seconds: float) -> str:
    return f"เวลา / time: **{seconds:.1f}** วินาที / s"


def _bar(done: float, total: float, width: int = 10) -> str:
    filled = min(width, round(width * done / total)) if total else 0
    return "▰" * filled + "▱" * (width - filled)


def _progress_line(event: SummarizeProgress, seconds: float) -> str:
    """While a long text's pieces are summarized: the round, the pieces done and the tokens
    they have written so far (pieces that batch together often all finish on the same step,
    so the tokens are what moves while they are written). The bar is the larger of the two
    shares: a piece may stop before its budget."""
    done, total, tokens = event.chunks_done, event.chunks_total, event.tokens_done
    if done == 0 and tokens == 0:
        step = f"แบ่งเป็น {total:,} ส่วน / split into {total:,} chunks"
    else:
        step = (f"ส่วนที่เสร็จ {done:,} จาก {total:,} / {done:,} of {total:,} chunks done · "
                f"เขียนแล้ว {tokens:,} โทเค็น / {tokens:,} tokens written")
    share = done / total if total else 0.0
    if event.tokens_budget:
        share = max(share, min(1.0, tokens / event.tokens_budget))
    return (f"ข้อความยาว สรุปทีละส่วน / long text, summarized in chunks · "
            f"รอบที่ {event.round} / round {event.round} · {step} {_bar(share, 1.0)} · "
            f"{_took(seconds)}")


def _combining_line(round_: int, seconds: float) -> str:
    return (f"รวมสรุปของทุกส่วน / combining the chunk summaries · "
            f"รอบที่ {round_} / round {round_} · {_took(seconds)}")


def _streaming_line(round_: int, seconds: float) -> str:
    where = f" · รอบที่ {round_} / round {round_}" if round_ > 1 else ""
    return f"กำลังสรุป… / summarizing…{where} · {_took(seconds)}"


def _done_line(response: SummarizeResponse, seconds: float) -> str:
    usage = response.usage
    used = (f"โทเค็น / tokens: {usage.input_tokens:,} + {usage.output_tokens:,} = "
            f"**{usage.total_tokens:,}**")
    pieces = (f" · {response.chunks:,} ส่วน {response.rounds} รอบ / {response.chunks:,} chunks "
              f"in {response.rounds} rounds" if response.rounds > 1 else "")
    cut = " · ⚠ ถึงความยาวสูงสุด / hit the length limit" if response.finish_reason == "length" else ""
    return f"เสร็จ / done · {used} · {_took(seconds)}{pieces}{cut}"


def document_markdown(document: DocumentText) -> str:
    """One line naming an uploaded document: name, kind, pages, characters."""
    parts = [f"เอกสาร / document: **{html.escape(document.filename)}**", document.kind.upper()]
    if document.pages:
        parts.append(f"{document.pages:,} หน้า / pages")
    parts.append(f"{document.characters:,} ตัวอักษร / characters")
    return " · ".join(parts)


def tenant_of(request: Any) -> str:
    """Whom the engine works for (:mod:`api.engine.tenants`): the key's label on a protected
    UI (the auth middleware stored it), else the visitor's address as the app's
    trusted-proxy step settled it; never the session hash, which the client chooses."""
    if request is None:
        return ui_tenant("unknown")
    label = getattr(getattr(request, "state", None), "client_id", None)  # starlette's State
    if label:
        return key_tenant(str(label))
    host = getattr(getattr(request, "client", None), "host", None)
    return ui_tenant(str(host) if host else "unknown")


def _session_of(request: Any) -> str:
    session = getattr(request, "session_hash", None)
    return str(session) if session else "-"


def _client_of(request: Any) -> str:
    """Who the event is for, as the UI guard counts clients (the key's label when the UI is
    protected, else the address after the trusted-proxy step): the session hash is the
    client's own invention, this is not."""
    scope = getattr(getattr(request, "request", None), "scope", None)
    if isinstance(scope, dict):
        return client_identity(scope)
    host = getattr(getattr(request, "client", None), "host", None) if request is not None else None
    return f"ip-{host}" if host else "-"


def _portable(results: list) -> list:
    """Results as the worker process needs them (the requests themselves stay here)."""
    return [dataclasses.replace(r, row=dataclasses.replace(r.row, request=None)) for r in results]
