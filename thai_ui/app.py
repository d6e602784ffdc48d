"""The Gradio Blocks: model status on top, a Summarize tab, a Batch tab and a Chat tab.

Built per app (nothing at import time) around a :class:`UIHandlers`, which
calls the engine in-process. Concurrency limits are off for every event: the
engine's continuous batching and wait queue govern the GPU for UI and API
requests alike, and an overloaded engine answers with an error the UI shows.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from api.settings import ModelSettings  # noqa: E402
from thai_ui.batch import MAX_ROWS, progress_html  # noqa: E402
from thai_ui.handlers import UIHandlers  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
# (label, file) of the example texts shown under the input.
EXAMPLES = (("ข่าว / news", "news.txt"), ("รายงาน / report", "report.txt"),
            ("บทความยาว / long article", "long_article.txt"))
# Summary length presets, in tokens; "custom" leaves the slider where the user put it.
LENGTHS = {"สั้น / short": 64, "กลาง / medium": 150, "ยาว / long": 300}
CUSTOM = "กำหนดเอง / max tokens"
DOCUMENT_LABEL = ".txt .md .html .docx .pdf"
STATUS_POLL_S = 2.0
# The live counters (tokenizer + word segmentation, CPU-bound) run one at a time for all
# visitors together, so anonymous typing can never take more than one core from generation.
STATS_CONCURRENCY = {"concurrency_limit": 1, "concurrency_id": "text-stats"}
CLEAR_RESULTS_JS = "() => ['', '']"
DEFAULT_CHAT_SYSTEM = "คุณเป็นผู้ช่วยที่ตอบเป็นภาษาไทยอย่างสุภาพ ถูกต้อง และกระชับ"


def load_examples() -> list[tuple[str, str]]:
    return [(label, (EXAMPLES_DIR / name).read_text(encoding="utf-8").strip())
            for label, name in EXAMPLES]


def build_blocks(handlers: UIHandlers, settings: ModelSettings, *,
                 queue_max_size: int | None = None) -> gr.Blocks:
    with gr.Blocks(title="Thai LLM · สรุปความและสนทนา", analytics_enabled=False) as blocks:
        gr.Markdown("# สรุปความและสนทนาภาษาไทย · Thai summarize & chat")
        status = gr.HTML(handlers.status()[0], elem_id="model-status")
        # The picker is an input only where the settings can serve several models, so a
        # one-model server's Gradio functions keep the inputs its API callers already send.
        picker = model_picker(handlers) if serves_several_models(settings) else None
        picked = [picker] if picker is not None else []
        poll = gr.Timer(STATUS_POLL_S)

        def refresh_status(current=None):
            html, final = handlers.status()
            if picker is None:
                return html, gr.Timer(active=not final)
            # the served names are known once the model is loaded (and adapters may be
            # loaded later): each page load and status poll refreshes the picker
            return html, gr.Timer(active=not final), handlers.model_picker(current)

        for event in (poll.tick, blocks.load):
            event(refresh_status, inputs=picked, outputs=[status, poll, *picked],
                  show_progress="hidden", api_visibility="private", queue=False)

        with gr.Tabs():
            with gr.Tab("สรุปความ / Summarize", id="summarize"):
                text, max_tokens, stats = _summarize_tab(handlers, settings, picked)
            with gr.Tab("สรุปทั้งไฟล์ / Batch", id="batch"):
                _batch_tab(handlers, settings, picked)
            with gr.Tab("สนทนา / Chat", id="chat"):
                _chat_tab(handlers, settings, picked)
        blocks.load(handlers.stats_markdown, inputs=[text, max_tokens], outputs=[stats],
                    show_progress="hidden", api_visibility="private", **STATS_CONCURRENCY)
        # Leaving the page (Gradio's heartbeat ends) cancels the session's batch.
        blocks.unload(handlers.end_session)
    # Generation is governed by the engine's queue; the queue here only bounds waiting
    # events, and api_open=False keeps queued functions off the direct /run/ route.
    blocks.queue(default_concurrency_limit=None, max_size=queue_max_size, api_open=False)
    return blocks


def serves_several_models(settings: ModelSettings) -> bool:
    """Adapters named at start, or per-row adapters that may be loaded at run time."""
    return bool(settings.lora_modules) or settings.enable_lora


def model_picker(handlers: UIHandlers) -> gr.Dropdown:
    """One picker for every tab, shown only when the server serves more than one model
    (adapters, or the base). Its value goes with each request as the API's ``model``; the
    handlers check it (allow_custom_value: Gradio's own refusal would be English only, and
    the choices are known only once the model is loaded)."""
    names = handlers.model_names()
    return gr.Dropdown(names, value=names[0], label="โมเดล / model", interactive=True,
                       allow_custom_value=True, visible=len(names) > 1,
                       elem_id="model-picker")


def _generation_controls(settings: ModelSettings, *, render: bool = True) -> tuple[gr.Slider, gr.Slider]:
    max_tokens = gr.Slider(1, settings.max_tokens_limit, value=min(settings.max_new_tokens,
                                                                    settings.max_tokens_limit),
                           step=1, label="ความยาวสูงสุด (โทเค็น) / max tokens", render=render)
    temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05,
                            label="ความหลากหลาย / temperature", render=render)
    return max_tokens, temperature


def _summarize_tab(handlers: UIHandlers, settings: ModelSettings,
                   picked: list[gr.Dropdown]) -> tuple[gr.Textbox, gr.Slider, gr.Markdown]:
    """Input, length and temperature, streamed summary; returns what the page load refreshes."""
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="ข้อความภาษาไทย / Thai text", lines=14, max_lines=30,
                              placeholder="วางข้อความภาษาไทยที่ต้องการสรุปที่นี่… / Paste Thai text here…",
                              elem_id="thai-input")
            stats = gr.Markdown(handlers.stats_markdown("", None), elem_id="text-stats")
            examples = load_examples()
            gr.Examples([[body] for _, body in examples], inputs=[text],
                        example_labels=[label for label, _ in examples],
                        label="ตัวอย่าง / Examples")
        with gr.Column(scale=2):
            # No file_types: a wrong type reaches the handler, which says so in Thai and
            # English (Gradio's own check, client and server side, speaks English only).
            document = gr.File(label="หรือเลือกไฟล์ / or choose a file", type="filepath",
                               file_count="single", height=120, elem_id="document-file")
            document_hint = (f"รองรับ / accepts {DOCUMENT_LABEL} · ไม่เกิน / at most "
                             f"{_mib(handlers.document_max_bytes)}")
            document_info = gr.Markdown(document_hint, elem_id="document-info")
            length = gr.Radio([*LENGTHS, CUSTOM], value="กลาง / medium",
                              label="ความยาวสรุป / summary length")
            max_tokens, temperature = _generation_controls(settings)
            max_tokens.value = min(LENGTHS["กลาง / medium"], settings.max_tokens_limit)
            button = gr.Button("สรุป / Summarize", variant="primary", elem_id="summarize-btn")
    summary = gr.Textbox(label="สรุป / Summary", lines=8, interactive=False, buttons=["copy"],
                         elem_id="thai-summary")
    usage = gr.Markdown("", elem_id="summary-usage")

    length.input(lambda choice, current: LENGTHS.get(choice, current), inputs=[length, max_tokens],
                 outputs=[max_tokens], api_visibility="private", queue=False)
    max_tokens.input(lambda _: CUSTOM, inputs=[max_tokens], outputs=[length],
                     api_visibility="private", queue=False)
    # A result belongs to the text it was made from: a changed text (typed, an example, a
    # chosen document) and a new run clear the summary and its line, in the browser at once.
    for trigger in (text.change, document.upload, button.click):
        trigger(None, js=CLEAR_RESULTS_JS, outputs=[summary, usage], queue=False,
                api_visibility="private", show_progress="hidden")
    for trigger in (text.change, max_tokens.change):
        trigger(handlers.stats_markdown, inputs=[text, max_tokens], outputs=[stats],
                trigger_mode="always_last", show_progress="hidden", api_visibility="private",
                **STATS_CONCURRENCY)
    # show_progress="hidden": an error is said once, in the toast (Thai and English), not
    # also as red badges over the outputs; the line under the summary shows the progress.
    button.click(handlers.summarize, inputs=[text, max_tokens, temperature, *picked],
                 outputs=[summary, usage], api_name="summarize", concurrency_limit=None,
                 show_progress="hidden")
    # A chosen file's text goes into the box (editable; the counters follow it).
    document.upload(handlers.load_document, inputs=[document], outputs=[text, document_info],
                    api_visibility="private", concurrency_limit=None, show_progress="hidden")
    document.clear(lambda: document_hint, outputs=[document_info], api_visibility="private",
                   queue=False)
    # API only (gradio_client): a document's summary in one call. The button is never shown.
    file_button = gr.Button("summarize_file", visible=False, elem_id="summarize-file-api")
    file_button.click(handlers.summarize_file, inputs=[document, max_tokens, temperature, *picked],
                      outputs=[summary, usage], api_name="summarize_file", concurrency_limit=None)
    return text, max_tokens, stats


def _mib(size: int) -> str:
    return f"{size / 1048576:.1f} MiB" if size >= 1048576 else f"{size / 1024:.0f} KiB"


def _batch_tab(handlers: UIHandlers, settings: ModelSettings, picked: list[gr.Dropdown]) -> None:
    """A CSV/XLSX of texts in, the same file with a summary column out."""
    gr.Markdown(
        f"สรุปข้อความทีละแถวจากไฟล์ CSV (UTF-8) หรือ Excel (.xlsx) แถวแรกเป็นชื่อคอลัมน์ "
        f"ไม่เกิน **{MAX_ROWS:,} แถว** ผลลัพธ์เป็นไฟล์ชนิดเดียวกันที่มีคอลัมน์ summary เพิ่ม  \n"
        f"Summarize a CSV (UTF-8) or Excel (.xlsx) file row by row: a header row, then one text "
        f"per row, at most **{MAX_ROWS:,} rows**. You get the same kind of file back with a "
        f"summary column (and an error column for rows that failed).", elem_id="batch-intro")
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.File(label="ไฟล์ตาราง / table file", type="filepath",
                            file_count="single", height=120, elem_id="batch-file")
            table_hint = (f"รองรับ / accepts .csv (UTF-8) .xlsx · ไม่เกิน / at most "
                          f"{_mib(handlers.document_max_bytes)}, {MAX_ROWS:,} แถว / rows")
            table_info = gr.Markdown(table_hint, elem_id="batch-file-info")
            column = gr.Dropdown([], value=None, label="คอลัมน์ข้อความ / text column",
                                 interactive=True, allow_custom_value=False,
                                 elem_id="batch-column")
        with gr.Column(scale=2):
            length = gr.Radio([*LENGTHS, CUSTOM], value="กลาง / medium",
                              label="ความยาวสรุป / summary length", elem_id="batch-length")
            max_tokens, temperature = _generation_controls(settings)
            max_tokens.value = min(LENGTHS["กลาง / medium"], settings.max_tokens_limit)
            with gr.Row():
                run = gr.Button("เริ่มสรุป / Run", variant="primary", elem_id="batch-run")
                stop = gr.Button("หยุด / Stop", variant="stop", elem_id="batch-stop")
    progress = gr.HTML(progress_html("idle"), elem_id="batch-progress")
    result = gr.File(label="ไฟล์ผลลัพธ์ / result file", interactive=False, elem_id="batch-result")

    length.input(lambda choice, current: LENGTHS.get(choice, current), inputs=[length, max_tokens],
                 outputs=[max_tokens], api_visibility="private", queue=False)
    max_tokens.input(lambda _: CUSTOM, inputs=[max_tokens], outputs=[length],
                     api_visibility="private", queue=False)
    table.upload(handlers.batch_columns, inputs=[table], outputs=[column, table_info],
                 api_visibility="private", concurrency_limit=None)
    table.clear(lambda: (gr.update(choices=[], value=None), table_hint), outputs=[column, table_info],
                api_visibility="private", queue=False)
    run.click(handlers.run_batch, inputs=[table, column, max_tokens, temperature, *picked],
              outputs=[progress, result], api_visibility="private", concurrency_limit=None,
              show_progress="hidden")
    stop.click(handlers.stop_batch, api_visibility="private", queue=False)


def _chat_tab(handlers: UIHandlers, settings: ModelSettings, picked: list[gr.Dropdown]) -> None:
    system_prompt = gr.Textbox(DEFAULT_CHAT_SYSTEM, label="คำสั่งระบบ / system prompt", lines=2,
                               render=False)
    max_tokens, temperature = _generation_controls(settings, render=False)
    gr.ChatInterface(
        handlers.chat,
        chatbot=gr.Chatbot(label="แชต / Chat", height=420, buttons=["copy", "copy_all"],
                           elem_id="thai-chat"),
        textbox=gr.Textbox(placeholder="พิมพ์ข้อความ… / Type a message…", submit_btn=True,
                           elem_id="chat-input", show_label=False),
        additional_inputs=[system_prompt, max_tokens, temperature, *picked],
        additional_inputs_accordion=gr.Accordion("ตั้งค่า / Settings", open=True, render=False),
        api_name="chat",
        concurrency_limit=None,
        fill_height=False,
        autofocus=False,
        save_history=False,
    )
