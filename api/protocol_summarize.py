"""Request and response schemas of ``POST /v1/summarize`` and
``POST /v1/summarize/document``: the request, its streamed progress and text, and the
response with its usage and, for a document, what was read from the file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.protocol import FinishReason, check_json_input

SummarizeStrategy = Literal["auto", "single"]


class SummarizeRequest(BaseModel):
    """The summarize request (text, max_tokens, temperature, top_p, model), plus long-text
    strategy and streaming. Any other field
    is a 400 naming it: nothing sent is silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)
    text: str = Field(min_length=1, max_length=200_000, description="Thai text to summarize.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens in the summary.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    model: str | None = Field(None, max_length=256, description="Optional; checked when given.")
    strategy: SummarizeStrategy = Field(
        "auto", description="auto: a text longer than THAI_SUMMARY_CHUNK_TOKENS tokens (or one "
        "that does not fit the context window) is split on Thai sentence boundaries, the pieces "
        "are summarized concurrently and their summaries summarized again, until one call "
        "holds it all. single: one call; a text that does not fit gets HTTP 400 "
        "context_length_exceeded.")
    stream: bool = Field(
        False, description="Send Server-Sent Events: summarize.progress while pieces are "
        "summarized, summarize.delta with the final summary's text as it is generated, "
        "summarize.result with the whole response, then [DONE].")


class SummarizeUsage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens of every call (all pieces, all rounds).")
    output_tokens: int = Field(description="Generated tokens of every call.")
    total_tokens: int


class SummarizeResponse(BaseModel):
    summary: str
    model: str
    usage: SummarizeUsage
    finish_reason: FinishReason = Field(description="The final summary's: stop, or length when "
                                        "it reached max_tokens.")
    chunks: int = Field(1, description="Pieces summarized in all rounds, the final summary "
                        "included: 1 for a text that fitted in one call.")
    rounds: int = Field(1, description="Rounds of summarization: 1 for a text that fitted, "
                        "2 for pieces then the summary of their summaries, and so on.")


class DocumentInfo(BaseModel):
    filename: str = Field(description="The uploaded file's name.")
    kind: str = Field(description="The format the text was extracted from (pdf, docx, html, ...).")
    pages: int | None = Field(None, description="Pages of a PDF or Word document; null for "
                              "formats without pages.")
    characters: int = Field(description="Characters of text extracted from the file.")


class SummarizeDocumentResponse(SummarizeResponse):
    document: DocumentInfo


class SummarizeDocumentForm(BaseModel):
    """The form fields of ``POST /v1/summarize/document`` next to ``file`` (the same options
    as /v1/summarize). Form values are text, so numbers and booleans are parsed from it;
    any other field is refused."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens in the summary.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    model: str | None = Field(None, max_length=256, description="Optional; checked when given.")
    strategy: SummarizeStrategy = Field("auto", description="As in /v1/summarize.")
    stream: bool = Field(False, description="As in /v1/summarize: Server-Sent Events.")


class SummarizeProgress(BaseModel):
    """A streamed step of a summary: a round began (``chunks_done`` 0), its pieces wrote
    more tokens (``tokens_done``), or one of its pieces is done. The round with ``final: true`` is the one call whose text is the summary."""

    object: Literal["summarize.progress"] = "summarize.progress"
    round: int = Field(description="1 for the pieces of the text, 2 for pieces of their "
                       "summaries, ...")
    chunks_done: int
    chunks_total: int = Field(description="Pieces in this round.")
    final: bool = Field(description="True for the last round: one call, whose text streams "
                        "as summarize.delta events.")
    tokens_done: int = Field(0, ge=0, description="Tokens the round's pieces have written so "
                             "far, all pieces together (sent every few tokens while they are "
                             "written, and with each finished piece); 0 in the final round, "
                             "whose text streams as summarize.delta events.")
    tokens_budget: int = Field(0, ge=0, description="Most tokens the round's calls may write: "
                               "chunks_total times each call's max_tokens.")


class SummarizeDelta(BaseModel):
    """New text of the final summary, as it is generated."""

    object: Literal["summarize.delta"] = "summarize.delta"
    delta: str
