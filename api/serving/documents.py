"""Summaries of files: text extracted from the upload in a sandboxed worker process
(:class:`api.documents.pool.ParsePool`, never in the serving process), then summarized like
``/v1/summarize`` does, long documents in pieces."""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.documents.errors import DocumentTooLargeError, EmptyDocumentError
from api.documents.extract import ExtractedDocument, extract_document
from api.documents.pool import ParsePool
from api.engine import Engine
from api.protocol_summarize import DocumentInfo, SummarizeDocumentResponse
from api.serving.summarize import ProgressCallback, SummarizeServing, SummaryOptions, SummaryRun, summary_sse
from api.settings import ModelSettings, ServerSettings
from api.text import is_blank

DEFAULT_DOCUMENT_MAX_BYTES: int = ServerSettings.model_fields["document_max_bytes"].default
DEFAULT_DOCUMENT_MAX_PAGES: int = ServerSettings.model_fields["document_max_pages"].default


class DocumentServing(SummarizeServing):
    """``POST /v1/summarize/document``: extract, then summarize."""

    def __init__(self, engine: Engine, settings: ModelSettings, *,
                 document_max_bytes: int | None = None, document_max_pages: int | None = None,
                 parse_pool: ParsePool | None = None):
        super().__init__(engine, settings)
        self.document_max_bytes = document_max_bytes or DEFAULT_DOCUMENT_MAX_BYTES
        self.document_max_pages = document_max_pages or DEFAULT_DOCUMENT_MAX_PAGES
        self._parse_pool = parse_pool  # the app's (create_app closes it); else one of our own

    @property
    def parse_pool(self) -> ParsePool:
        """The worker processes that parse files (a default pool when none was given)."""
        if self._parse_pool is None:
            self._parse_pool = ParsePool()
        return self._parse_pool

    async def extract_document(self, data: bytes, filename: str, *,
                               client: str = "-") -> ExtractedDocument:
        """The file's text (``api.documents.extract``), parsed in a sandboxed worker process
        of :attr:`parse_pool` as one of ``client``'s parse jobs: a hostile file costs that
        process (killed and replaced when it overruns), never this one's memory or GIL."""
        if not data:
            raise EmptyDocumentError("The file is empty (0 bytes); upload the document to "
                                     "summarize.")
        if len(data) > self.document_max_bytes:
            raise DocumentTooLargeError(len(data), self.document_max_bytes)
        pool = self.parse_pool
        return await pool.run(client, extract_document, data, filename,
                              max_bytes=self.document_max_bytes,
                              max_pages=self.document_max_pages,
                              time_budget_s=0.8 * pool.timeout_s)

    async def start_document_summary(self, data: bytes, filename: str, options: SummaryOptions,
                                     tenant: str | None = None) -> SummaryRun:
        """Admit and start the summary of a file (errors, extraction's too, raise here)."""
        self.summary_params(options)  # a wrong model or max_tokens fails before the parsing
        document = await self.extract_document(data, filename, client=tenant or "-")
        if is_blank(document.text):
            raise EmptyDocumentError("No text could be extracted from the file.")
        info = DocumentInfo(filename=document.filename, kind=document.kind, pages=document.pages,
                            characters=document.characters)
        return await self.start_summary(document.text, options, document=info, tenant=tenant)

    async def summarize_document(self, data: bytes, filename: str, options: SummaryOptions, *,
                                 on_progress: ProgressCallback | None = None,
                                 tenant: str | None = None) -> SummarizeDocumentResponse:
        run = await self.start_document_summary(data, filename, options, tenant)
        return await run.response(on_progress)

    async def summarize_document_stream(self, data: bytes, filename: str, options: SummaryOptions,
                                        tenant: str | None = None) -> AsyncIterator[str]:
        """Admit now (errors raise before streaming), then yield SSE ``data:`` lines."""
        return summary_sse(await self.start_document_summary(data, filename, options, tenant))
