"""Errors shown in the UI, in Thai and in English.

The engine and the serving layer raise the same exceptions for the UI as for
the HTTP API; here they become a ``gr.Error`` whose message a Thai reader and
an English reader both understand. The code comes from ``api.errors.status_for``
so the UI and the API classify failures the same way.
"""

from __future__ import annotations

import gradio as gr
from pydantic import ValidationError

from api.errors import status_for

# error code -> (Thai, English)
MESSAGES: dict[str, tuple[str, str]] = {
    "empty_text": ("กรุณาวางข้อความภาษาไทยที่ต้องการสรุปก่อน",
                   "Please paste the Thai text to summarize first."),
    "empty_message": ("กรุณาพิมพ์ข้อความก่อนส่ง", "Please type a message first."),
    "text_too_long": ("ข้อความยาวเกินไป", "The text is too long."),
    "context_length_exceeded": ("ข้อความยาวเกินกว่าที่โมเดลรับได้ ลองตัดข้อความให้สั้นลงหรือลดความยาวสรุป",
                                "The text does not fit the model's context; shorten it or ask "
                                "for a shorter summary."),
    "max_tokens_too_large": ("ความยาวสรุปเกินขีดจำกัดของเซิร์ฟเวอร์",
                             "The requested length is above this server's limit."),
    "model_not_ready": ("โมเดลยังโหลดไม่เสร็จ กรุณารอสักครู่แล้วลองอีกครั้ง",
                        "The model is still loading; try again in a few seconds."),
    "model_load_failed": ("โหลดโมเดลไม่สำเร็จ", "The model could not be loaded."),
    "engine_dead": ("ระบบประมวลผลหยุดทำงาน กรุณาแจ้งผู้ดูแล",
                    "The inference engine stopped; please tell the administrator."),
    "out_of_memory": ("หน่วยความจำไม่พอ ลองข้อความที่สั้นลง",
                      "Out of memory; try a shorter text."),
    "server_overloaded": ("มีผู้ใช้งานจำนวนมาก กรุณาลองใหม่อีกครั้ง",
                          "The server is busy; please try again."),
    "request_timeout": ("ใช้เวลานานเกินกำหนด", "The request took too long."),
    "invalid_request": ("คำขอไม่ถูกต้อง", "Invalid request."),
    "internal": ("เกิดข้อผิดพลาดภายในระบบ", "Internal error."),
}


def bilingual(code: str, detail: str | None = None) -> str:
    thai, english = MESSAGES.get(code, MESSAGES["internal"])
    text = f"{thai} / {english}"
    return f"{text} ({detail})" if detail else text


def ui_error(code: str, detail: str | None = None) -> gr.Error:
    return gr.Error(bilingual(code, detail), title="ข้อผิดพลาด / Error", print_exception=False)


def error_for(exc: BaseException) -> gr.Error:
    """The ``gr.Error`` to raise for an exception from the serving layer or the engine."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "string_too_long":
            limit = first.get("ctx", {}).get("max_length")
            return ui_error("text_too_long", f"max {limit:,} characters" if limit else None)
        return ui_error("invalid_request", first.get("msg"))
    status, _, code = status_for(exc)
    if code in MESSAGES:
        detail = str(exc) if code in ("context_length_exceeded", "max_tokens_too_large") else None
        return ui_error(code, detail)
    if status < 500:
        return ui_error("invalid_request", str(exc))
    return ui_error("internal")
