"""Serving logic: turn API requests into engine calls and engine output into
response objects. No HTTP here: routers turn these objects into responses, and
the Gradio UI and the batch runner call the same methods in-process.

One module per endpoint family (as vLLM's ``entrypoints/openai`` does):

- :mod:`api.serving.common`: the engine, settings, model check, sampling
  parameters, encoding, one complete generation; what anonymous callers may see
  of the model (:func:`public_base_model`, :func:`public_failure`).
- :mod:`api.serving.chat`: ``/v1/chat/completions``.
- :mod:`api.serving.completions`: ``/v1/completions`` (legacy text completions, vLLM's).
- :mod:`api.serving.responses`: ``/v1/responses`` (OpenAI's Responses API, on chat's
  code; its own object, ``app.state.responses``, with the response store).
- :mod:`api.serving.summarize`: ``/v1/summarize``, long texts in pieces
  (:class:`SummaryRun`: progress events, the final summary's text as it comes).
- :mod:`api.serving.documents`: ``/v1/summarize/document``.
- :mod:`api.serving.tokenize`: ``/tokenize``, ``/detokenize`` (vLLM's).

:class:`Serving` puts them together: one object per app (``app.state.serving``).
"""

from __future__ import annotations

from api.engine import Engine
from api.serving.chat import ChatServing
from api.serving.completions import CompletionServing
from api.serving.common import (
    INLINE_ENCODE_CHARS,
    Completion,
    ServingBase,
    private_paths,
    public_base_model,
    public_failure,
)
from api.serving.documents import DocumentServing
from api.serving.summarize import SummaryEvent, SummaryOptions, SummaryRun, sse_event
from api.serving.tokenize import TokenizeServing
from api.settings import ModelSettings

__all__ = [
    "INLINE_ENCODE_CHARS", "Completion", "CompletionServing", "DocumentServing", "Serving", "ServingBase",
    "SummaryEvent", "SummaryOptions", "SummaryRun", "private_paths", "public_base_model",
    "public_failure", "sse_event", "TokenizeServing",
]


class Serving(TokenizeServing, ChatServing, CompletionServing, DocumentServing):
    """Shared by the OpenAI routes, the summarize routes, the UI and the batch runner."""

    def __init__(self, engine: Engine, settings: ModelSettings, *,
                 document_max_bytes: int | None = None, document_max_pages: int | None = None,
                 parse_pool=None):
        super().__init__(engine, settings, document_max_bytes=document_max_bytes,
                         document_max_pages=document_max_pages, parse_pool=parse_pool)
