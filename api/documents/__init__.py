"""Documents: text out of uploaded files (.txt, .md, .html, .docx, .pdf), Thai PDF text
repair, and splitting long Thai text into pieces that fit a token budget.

No HTTP here; errors are :class:`api.documents.errors.DocumentError` subclasses that carry
their HTTP status and error code for the API's error mapper.
"""

from api.documents.chunking import split_text
from api.documents.errors import DocumentError
from api.documents.extract import ExtractedDocument, extract_document
from api.documents.thai_pdf import clean_thai_pdf_pages, clean_thai_pdf_text

__all__ = ["DocumentError", "ExtractedDocument", "clean_thai_pdf_pages", "clean_thai_pdf_text",
           "extract_document", "split_text"]
