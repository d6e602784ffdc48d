"""POST /v1/summarize/document: summarize an uploaded file (PDF, Word, HTML, Markdown, text).

The body is ``multipart/form-data``: the ``file`` and, as form fields, the options of
``/v1/summarize``. The form is read here rather than through FastAPI's ``File``/``Form``
parameters, which ignore fields they do not know: an option misspelled (``max_token``)
would silently do nothing. Here a body that is not multipart, a missing or empty file,
a second file, an unknown or repeated field all get a 400 that says which.

The app's body limit for this path is ``THAI_DOCUMENT_MAX_BYTES`` plus room for the form
(:func:`api.settings.document_body_limit`), counted as the body streams in, so an upload
without ``Content-Length`` is cut at the limit too. The key check and the rate limit are
the app's middlewares: they apply here as to every ``/v1`` route. The file is parsed in a
sandboxed worker process (:mod:`api.documents.pool`), as one of the client's parse jobs:
at most ``THAI_PARSE_JOBS_PER_CLIENT`` at once (429 beyond), and a file that overruns
``THAI_PARSE_TIMEOUT_S`` or ``THAI_PARSE_MEMORY_MB`` gets 422.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.errors import InvalidRequestError, clip
from api.middleware import DOCUMENT_UPLOAD_PATH
from api.protocol import ErrorResponse
from api.protocol_summarize import SummarizeDocumentForm, SummarizeDocumentResponse
from api.routes.deps import cancel_on_disconnect, event_stream_response, get_serving, request_tenant
from api.routes.openai_chat import ERRORS
from api.routes.summarize import SUMMARY_STREAM_DOC
from api.serving import Serving, SummaryOptions

router = APIRouter()

DOCUMENT_PATH = DOCUMENT_UPLOAD_PATH
FILE_FIELD = "file"
OPTION_FIELDS = tuple(SummarizeDocumentForm.model_fields)
MAX_FIELD_BYTES = 16 * 1024  # an option's value; the file has the document limit


def _form_schema() -> dict:
    schema = SummarizeDocumentForm.model_json_schema()
    schema["properties"] = {
        FILE_FIELD: {"type": "string", "format": "binary", "description":
                     "The document: PDF, Word (.docx), HTML, Markdown or plain text; at most "
                     "THAI_DOCUMENT_MAX_BYTES bytes and THAI_DOCUMENT_MAX_PAGES pages."},
        **schema["properties"]}
    schema["required"] = [FILE_FIELD]
    return schema


@router.post(
    DOCUMENT_PATH, response_model=SummarizeDocumentResponse,
    responses={**ERRORS, 422: {"model": ErrorResponse, "description":
                               "The file overran its reader's time or memory limit "
                               "(THAI_PARSE_TIMEOUT_S, THAI_PARSE_MEMORY_MB)"},
               200: {"content": {"text/event-stream": {}}, "description":
                               "JSON, or SSE when stream=true. " + SUMMARY_STREAM_DOC + " The "
                               "summarize.result event carries `document` too."}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _form_schema()}}}})
async def summarize_document(request: Request, serving: Serving = Depends(get_serving),
                             tenant: str = Depends(request_tenant)):
    """Summarize an uploaded document.

    The text is extracted from the file (pages of a PDF or Word document, the visible text
    of HTML), then summarized as `/v1/summarize` does: a long document in pieces. The
    response is `/v1/summarize`'s with `document`: the file's name, kind, pages and
    characters. Form fields other than `file` and the options below are refused; an empty
    value counts as not given.
    """
    upload, data, options = await read_document_form(request)
    summary = SummaryOptions.of(options)
    filename = upload.filename or ""
    if options.stream:
        events = await cancel_on_disconnect(
            request, serving.summarize_document_stream(data, filename, summary, tenant))
        return event_stream_response(request, events)
    return await cancel_on_disconnect(
        request, serving.summarize_document(data, filename, summary, tenant=tenant))


async def read_document_form(request: Request) -> tuple[UploadFile, bytes, SummarizeDocumentForm]:
    """The upload, its bytes and the validated options; a 400 for anything else sent."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise InvalidRequestError(
            f"Send the document as multipart/form-data (a '{FILE_FIELD}' part, options as form "
            f"fields), not {clip(content_type, 64) or 'a body without Content-Type'}",
            code="invalid_content_type")
    form = await request.form(max_files=1, max_fields=len(OPTION_FIELDS) + 8,
                              max_part_size=MAX_FIELD_BYTES)
    try:
        files: list[UploadFile] = []
        values: dict[str, str] = {}
        unknown: list[str] = []
        for name, value in form.multi_items():
            if name == FILE_FIELD:
                if not isinstance(value, UploadFile):
                    raise InvalidRequestError(f"'{FILE_FIELD}' must be a file part (with a "
                                              "filename), not a text field", param=FILE_FIELD)
                files.append(value)
            elif name not in OPTION_FIELDS:
                unknown.append(clip(name, 64))
            elif not isinstance(value, str):
                raise InvalidRequestError(f"'{name}' must be a text field, not a file",
                                          param=name)
            elif name in values:
                raise InvalidRequestError(f"'{name}' is given twice", param=name)
            elif value.strip():
                values[name] = value.strip()
        if unknown:
            raise InvalidRequestError(
                f"Unknown form field(s): {', '.join(sorted(unknown)[:8])}; this endpoint takes "
                f"'{FILE_FIELD}' and {', '.join(OPTION_FIELDS)}", param=unknown[0],
                code="unknown_field")
        if not files:
            raise InvalidRequestError(f"No file: send the document in a form field named "
                                      f"'{FILE_FIELD}'", param=FILE_FIELD, code="missing_file")
        try:
            options = SummarizeDocumentForm.model_validate(values)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        upload = files[0]
        data = await upload.read()
    finally:
        await form.close()
    return upload, data, options
