"""One error model and one mapper from exception class to HTTP status.

Every error leaves the server in OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``, so the official client
raises its typed exceptions (``NotFoundError``, ``RateLimitError``, ...).
Routes never build error responses themselves: they raise, and the handlers
registered by :func:`install_error_handlers` translate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.engine.errors import (
    AdapterError,
    AdapterInUseError,
    ContextLengthExceededError,
    EngineDeadError,
    EngineError,
    EngineOutOfMemoryError,
    EngineOverloadedError,
    GenerationTimeoutError,
    GrammarError,
    ModelLoadError,
    ModelNotReadyError,
    NoHealthyUpstreamError,
    UpstreamError,
    UnknownModelError,
    UpstreamStatusError,
)
from api.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("thai.api")


class APIError(Exception):
    """An error raised by the serving layer with its OpenAI type and code."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequestError(APIError):
    status_code = 400


class ModelNotFoundError(APIError):
    status_code = 404

    def __init__(self, name: str, served: str):
        super().__init__(f"The model `{clip(name, 256)}` does not exist. This server serves `{served}`.",
                         param="model", code="model_not_found")


class ClientDisconnectedError(APIError):
    """The client went away before its answer was ready (it timed out, or closed the tab).

    Nobody reads the response, but the status still counts: 499 (nginx's "client closed
    request") keeps these out of the 5xx counts in ``/metrics`` and out of the error log.
    """

    status_code = 499

    def __init__(self, waited_s: float):
        super().__init__(f"The client disconnected after {waited_s:.1f}s; the generation was "
                         "cancelled.", code="client_disconnected")


# Exception class -> (status, OpenAI error type, code). The one place statuses live.
ENGINE_ERRORS: dict[type[EngineError], tuple[int, str, str | None]] = {
    ContextLengthExceededError: (400, "invalid_request_error", "context_length_exceeded"),
    GrammarError: (400, "invalid_request_error", "invalid_structured_output"),
    EngineOverloadedError: (429, "rate_limit_error", "server_overloaded"),
    ModelNotReadyError: (503, "service_unavailable", "model_not_ready"),
    ModelLoadError: (503, "service_unavailable", "model_load_failed"),
    EngineOutOfMemoryError: (503, "service_unavailable", "out_of_memory"),
    EngineDeadError: (503, "service_unavailable", "engine_dead"),
    GenerationTimeoutError: (504, "timeout", "request_timeout"),
    NoHealthyUpstreamError: (503, "service_unavailable", "no_healthy_upstream"),
    UpstreamError: (502, "upstream_error", "upstream_failed"),
    AdapterError: (400, "invalid_request_error", "invalid_lora_adapter"),
    UnknownModelError: (404, "invalid_request_error", "model_not_found"),
    AdapterInUseError: (409, "invalid_request_error", "lora_adapter_in_use"),
}
_TYPE_FOR_STATUS = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                    503: "service_unavailable"}


MAX_ECHO_CHARS = 256  # the most of one client-sent name or value an error message quotes
MAX_MESSAGE_CHARS = 1024

# An absolute, home or dot-relative file path; not a URL (``https://host/x``), not a hub id
# (``Qwen/Qwen2.5-1.5B``), not ``and/or``: the slash must not follow a word character.
_PATH = re.compile(r"""(?<![\w:/.~-])(?:~|\.\.?)?/[^\s'"`,;()<>\[\]{}|]+""")
PATH_PLACEHOLDER = "<path>"


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters with a marker, so no error echoes megabytes back."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def redact_paths(text: str, private: Iterable[str] = ()) -> str:
    """``text`` without server file paths: the ``private`` ones (e.g. the configured model
    folders, relative ones too) and anything that looks like an absolute path.

    Load and engine failures are shown to anonymous users (``/health``, ``/ready``, the UI's
    banner, 503 bodies); the log keeps the full text.
    """
    for path in sorted({p for p in private if p and len(p) > 1}, key=len, reverse=True):
        text = text.replace(path, PATH_PLACEHOLDER)
    return _PATH.sub(PATH_PLACEHOLDER, text)


def error_body(status: int, message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param,
                                           code=code)).model_dump()


def status_for(exc: BaseException) -> tuple[int, str, str | None]:
    """Status, type and code for any exception (walks the class hierarchy)."""
    if isinstance(exc, APIError):
        return exc.status_code, exc.error_type, exc.code
    if isinstance(exc, UpstreamStatusError):  # the upstream's own answer, passed through
        return (exc.status, exc.error_type or _TYPE_FOR_STATUS.get(exc.status, "upstream_error"),
                exc.code if exc.code is not None else None)
    for cls in type(exc).__mro__:
        if cls in ENGINE_ERRORS:
            return ENGINE_ERRORS[cls]
    return 500, "internal_server_error", None


def error_content(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """Status, OpenAI error body and headers for ``exc``: for a response, or an SSE error event.

    Failures we did not raise on purpose are logged with their traceback and
    answered with a generic message, so no internals reach the client.
    """
    status, error_type, code = status_for(exc)
    if status >= 500 and not isinstance(exc, (APIError, EngineError)):
        log.error("unhandled error: %r", exc, exc_info=exc)
        message = "Internal server error; the request id in the X-Request-ID header identifies it in the logs."
    else:
        message = getattr(exc, "message", None) or str(exc)
        if isinstance(exc, EngineError):  # load failures quote model folders
            message = redact_paths(clip(message, MAX_MESSAGE_CHARS))
    headers = {}
    if getattr(exc, "retry_after", None):  # overloaded, or an upstream's 429/503
        headers["Retry-After"] = str(exc.retry_after)
    elif status == 503:
        headers["Retry-After"] = "5"
    param = getattr(exc, "param", None)
    return status, error_body(status, message, error_type, param, code), headers


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_content(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # A field *name* is client input too (a 2 MB key would come back in ``param``): clip both.
    loc = [clip(str(part), 64) for part in first.get("loc", ()) if part != "body"]
    param = clip(".".join(loc)) or None
    text = clip(str(first.get("msg", "invalid value")), MAX_MESSAGE_CHARS // 2)
    if first.get("type") == "json_invalid":
        detail = clip(str(first.get("ctx", {}).get("error", text)))
        return f"Request body is not valid JSON: {detail}", None
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return (f"{param}: {text}" if param else text) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = clip(exc.detail, MAX_MESSAGE_CHARS) if isinstance(exc.detail, str) else phrase
        error_type = "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
        code = getattr(exc, "code", None)  # e.g. api.middleware.RequestTooLarge
        return JSONResponse(error_body(exc.status_code, message, error_type, None, code),
                            status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    @app.exception_handler(EngineError)
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unknown(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
