"""Why a document could not be read, as exceptions the API's error mapper understands.

Every class is an :class:`api.errors.InvalidRequestError` (so HTTP 400 in OpenAI's error
envelope, ``param`` ``"file"``) with its own ``code``; a document over the size limit is
413. Nothing here knows HTTP beyond that class attribute: :func:`api.errors.status_for`
reads ``status_code`` and ``code`` from the exception.
"""

from __future__ import annotations

from api.errors import InvalidRequestError

SUPPORTED_TYPES = ".txt, .md, .html/.htm, .docx, .pdf"


class DocumentError(InvalidRequestError):
    """A document that cannot be read; the message says why, for the person who sent it."""

    status_code = 400
    default_code = "invalid_document"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message, param="file", code=code or self.default_code)

    def __reduce__(self):
        # picklable whatever a subclass's __init__ takes (to cross a process boundary)
        return _rebuild, (type(self), self.message, dict(self.__dict__))


def _rebuild(cls: type[DocumentError], message: str, state: dict) -> DocumentError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class DocumentTooLargeError(DocumentError):
    status_code = 413
    default_code = "document_too_large"

    def __init__(self, size: int, limit: int):
        super().__init__(f"The file is {size} bytes, over this server's limit of {limit} bytes "
                         f"({limit / 1048576:.1f} MiB, THAI_DOCUMENT_MAX_BYTES).")
        self.size, self.limit = size, limit


class TooManyPagesError(DocumentError):
    default_code = "document_too_many_pages"

    def __init__(self, pages: int, limit: int, *, kind: str = "document"):
        super().__init__(f"The {kind} has {pages} pages, over this server's limit of {limit} pages "
                         "(THAI_DOCUMENT_MAX_PAGES).")
        self.pages, self.limit = pages, limit


class UnsupportedDocumentError(DocumentError):
    """Unknown extension, or content of an unsupported kind."""

    default_code = "unsupported_document_type"

    def __init__(self, reason: str):
        super().__init__(f"{reason} Supported types: {SUPPORTED_TYPES}.")


class DocumentTypeMismatchError(UnsupportedDocumentError):
    """The extension says one type and the content another."""

    default_code = "document_type_mismatch"


class DocumentEncodingError(DocumentError):
    default_code = "document_encoding"


class MalformedDocumentError(DocumentError):
    default_code = "malformed_document"


class DocumentTooComplexError(DocumentError):
    """Within the size limit but too costly to read: a zip bomb, too many parts, too slow."""

    default_code = "document_too_complex"


class EncryptedDocumentError(DocumentError):
    default_code = "document_encrypted"


class ScannedPdfError(DocumentError):
    default_code = "pdf_without_text_layer"

    def __init__(self, pages: int):
        super().__init__(f"This is a scanned PDF ({pages} page(s) of images) without a text layer; "
                         "OCR is not supported. Upload a PDF with selectable text, or the source "
                         "document (.docx, .txt).")


class EmptyDocumentError(DocumentError):
    default_code = "document_empty"


class DocumentLimitError(DocumentTooComplexError):
    """The parser overran its sandbox (time, memory, CPU) and was killed: HTTP 422."""

    status_code = 422


class ParseBusyError(DocumentError):
    """This client already has as many files being read as it may: HTTP 429."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "too_many_parse_jobs"
    retry_after = 5


class ParseQueueFullError(DocumentError):
    """Every document reader is busy and the queue is full: HTTP 429, as an engine that is
    full answers."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_overloaded"
    retry_after = 5
