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
    "model_not_found": ("ไม่มีโมเดลที่เลือกในเซิร์ฟเวอร์นี้ กรุณาเลือกจากรายการ",
                        "This server does not serve the chosen model; pick one from the list."),
    # long texts (summarized in pieces)
    "too_many_chunks": ("ข้อความยาวเกินกว่าจะสรุปได้ในครั้งเดียว กรุณาแบ่งข้อความให้สั้นลง",
                        "The text is too long to summarize here, even in pieces; shorten it."),
    "summary_not_shrinking": ("สรุปแล้วไม่สั้นลง ลองลดความยาวสรุป",
                              "The summaries did not get shorter; ask for a shorter summary."),
    # documents (the summarize tab's file)
    "no_file": ("กรุณาเลือกไฟล์ก่อน", "Please choose a file first."),
    "document_too_large": ("ไฟล์ใหญ่เกินขีดจำกัดของเซิร์ฟเวอร์", "The file is larger than this "
                           "server accepts."),
    "document_too_many_pages": ("เอกสารมีจำนวนหน้ามากเกินขีดจำกัด",
                                "The document has more pages than this server accepts."),
    "unsupported_document_type": ("ไม่รองรับไฟล์ชนิดนี้ ใช้ได้: .txt .md .html .docx .pdf",
                                  "This type of file is not supported; use .txt, .md, .html, "
                                  ".docx or .pdf."),
    "document_type_mismatch": ("นามสกุลไฟล์ไม่ตรงกับเนื้อหาของไฟล์",
                               "The file's name says one type and its content another."),
    "document_encoding": ("อ่านรหัสอักขระของไฟล์ข้อความไม่ได้ กรุณาบันทึกเป็น UTF-8",
                          "The text file's encoding could not be read; save it as UTF-8."),
    "malformed_document": ("ไฟล์เสียหรืออ่านไม่ได้", "The file is damaged or unreadable."),
    "document_too_complex": ("ไฟล์ซับซ้อนเกินกว่าจะอ่านได้", "The file is too complex to read."),
    "document_encrypted": ("ไฟล์ถูกเข้ารหัสด้วยรหัสผ่าน กรุณาใช้ฉบับที่ไม่มีรหัสผ่าน",
                           "The file is password-protected; upload an unprotected copy."),
    "pdf_without_text_layer": ("PDF นี้เป็นภาพสแกน ไม่มีข้อความให้อ่าน (ไม่รองรับ OCR) "
                               "กรุณาใช้ PDF ที่เลือกข้อความได้ หรือไฟล์ต้นฉบับ (.docx, .txt)",
                               "This is a scanned PDF without a text layer (OCR is not "
                               "supported); upload a PDF with selectable text, or the source "
                               "document (.docx, .txt)."),
    "document_empty": ("ไม่พบข้อความในไฟล์", "No text was found in the file."),
    "invalid_document": ("อ่านไฟล์ไม่ได้", "The file could not be read."),
    "document_text_too_long": ("ข้อความในเอกสารยาวเกินกว่าที่สรุปได้ในครั้งเดียว กรุณาแบ่งเอกสาร",
                               "The document holds more text than one summary may take; split it."),
    # batch tables
    "unsupported_table_type": ("ใช้ได้เฉพาะไฟล์ .csv (UTF-8) หรือ .xlsx",
                               "Upload a .csv (UTF-8) or an .xlsx file."),
    "malformed_table": ("อ่านไฟล์ตารางไม่ได้", "The table could not be read."),
    "table_not_utf8": ("ไฟล์ CSV ต้องเป็น UTF-8 (ใน Excel ใช้ Save As \"CSV UTF-8\") หรือใช้ .xlsx",
                       "The CSV is not UTF-8 (in Excel use Save As \"CSV UTF-8\"), or upload "
                       "the .xlsx."),
    "table_column_missing": ("ไม่มีคอลัมน์ที่เลือกในไฟล์", "The file has no such column."),
    "choose_column": ("กรุณาเลือกคอลัมน์ที่เป็นข้อความ",
                      "Please choose the column that holds the text."),
    "too_many_rows": ("ไฟล์มีจำนวนแถวเกินขีดจำกัด", "The file has too many rows."),
    "empty_table": ("ไฟล์ไม่มีแถวข้อความ", "The file has no rows of text."),
    "batch_running": ("กำลังสรุปไฟล์อื่นอยู่ในหน้านี้ กรุณารอหรือกดหยุดก่อน",
                      "A batch is already running on this page; wait for it or stop it first."),
    "upload_quota_exceeded": ("พื้นที่เก็บไฟล์ของเซิร์ฟเวอร์เต็ม กรุณาลองใหม่ภายหลัง",
                              "The server's file storage is full; try again later."),
    "batch_client_busy": ("คุณมีงานสรุปไฟล์ที่กำลังทำงานอยู่แล้ว (ในแท็บหรือหน้าต่างอื่น) "
                          "กรุณารอให้เสร็จหรือกดหยุดก่อน",
                          "You already have a batch running (in another tab or window); wait "
                          "for it or stop it first."),
    "client_upload_quota_exceeded": ("ไฟล์ของคุณใช้พื้นที่เก็บไฟล์ครบส่วนของคุณแล้ว "
                                     "กรุณาลองใหม่ภายหลัง",
                                     "Your files fill your share of the server's file storage; "
                                     "try again later."),
}
# Codes whose English explanation (the reader's own words) is worth adding to the message.
DETAILED = frozenset({"context_length_exceeded", "max_tokens_too_large", "document_too_large",
                      "document_too_many_pages", "document_type_mismatch", "malformed_document",
                      "document_too_complex", "invalid_document", "malformed_table",
                      "table_column_missing", "too_many_rows", "too_many_chunks"})


def bilingual(code: str, detail: str | None = None) -> str:
    thai, english = MESSAGES.get(code, MESSAGES["internal"])
    text = f"{thai} / {english}"
    return f"{text} ({detail})" if detail else text


def ui_error(code: str, detail: str | None = None) -> gr.Error:
    return gr.Error(bilingual(code, detail), title="ข้อผิดพลาด / Error", print_exception=False)


def file_error(code: str, message: str | None = None) -> gr.Error:
    """The ``gr.Error`` for a file that could not be read (:class:`thai_ui.documents.FileJobError`)."""
    if code not in MESSAGES:
        return ui_error("invalid_document", message)
    return ui_error(code, message if code in DETAILED else None)


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
        detail = (getattr(exc, "message", None) or str(exc)) if code in DETAILED else None
        return ui_error(code, detail)
    if status < 500:
        return ui_error("invalid_request", str(exc))
    return ui_error("internal")
