"""Request and response schemas: the OpenAI chat API, the seed's summarize API,
health and model listing.

Validation lives here (``Field(ge=..., le=...)``), so routes and the serving
layer receive values that are already within bounds, and ``/docs`` shows every
field with its limits.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_STOP_SEQUENCES = 8


class TextPart(BaseModel):
    """One text part of a message content list (OpenAI's multi-part content)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = "text"
    text: str = Field(max_length=1_000_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the message; 'developer' is treated as 'system'."
    )
    content: str | list[TextPart] | None = Field(
        None, description="A string, or a list of text parts that are joined."
    )
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JSON_DEPTH = 64  # a chat request with content parts nests 4 levels; tool schemas a few more


def check_json_input(data: Any) -> Any:
    """Reject, as a 400, what the JSON parser accepts but the server must not process.

    - Nesting deeper than :data:`MAX_JSON_DEPTH`: a few hundred ``[`` in an ignored field
      once made a recursive walk here raise ``RecursionError`` (a 500 with a 100 KB
      traceback in the log). The walk is iterative and stops at the limit, so any depth
      costs the same few microseconds per level.
    - Half of a UTF-16 pair escaped alone (``"\\ud800"``): no valid text, so a 400, not
      a crash in the tokenizer or the JSON encoder.
    """
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value) is not None:
                raise ValueError("the request contains an unpaired UTF-16 surrogate escape "
                                 "(\\ud800-\\udfff), which is not valid Unicode text")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ValueError(f"the request body nests JSON objects or arrays more than "
                             f"{MAX_JSON_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((key, depth + 1) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        else:
            stack.extend((item, depth + 1) for item in value)
    return data



class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, plus vLLM's min_tokens / ignore_eos."""

    # strict: a wrong JSON type (false for a number, "5" for an integer) is a 400, not coerced.
    model_config = ConfigDict(extra="allow", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Same as max_tokens (newer OpenAI name); wins when both are set."
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    # vLLM extensions, needed by benchmarks for fixed-length outputs.
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens (vLLM).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (vLLM).")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=32, description="Extension.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops) or any(len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def passthrough_fields(self) -> dict[str, object]:
        """Fields sent that this server does not act on, for an engine whose upstream may
        (vLLM's ``repetition_penalty``, OpenAI's penalties); the local engine ignores them."""
        fields = dict(self.model_extra or {})
        if "no_repeat_ngram_size" in self.model_fields_set:  # our sampler's; sent when asked for
            fields["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                fields[name] = getattr(self, name)
        return fields

    def unsupported_fields(self) -> list[str]:
        """Fields sent that we do not honour (logged, never an error)."""
        extra = list((self.model_extra or {}).keys())
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                extra.append(name)
        return extra


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: None = None


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """A streamed delta; absent fields are left out of the JSON, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


# ------------------------------------------------------------ /v1/completions (legacy)
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_TOKEN_IDS = 131_072


class CompletionRequest(BaseModel):
    """OpenAI's legacy completion request as vLLM serves it, one prompt per request.

    ``prompt`` is a text or a list of token ids (or a list holding exactly one of those).
    Fields this server does not honour are refused by the serving layer (a 400 naming
    them) unless the engine is an upstream one, which passes them on; their no-op values
    (``n: 1``, ``logprobs: null``, ``best_of: 1``, zero penalties) are always accepted.
    """

    model_config = ConfigDict(extra="allow", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name.")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A text, or a list of token ids; a list of several prompts is refused.")
    suffix: str | None = Field(None, description="Not supported (a 400 when given).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Put the prompt's text before the completion.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported.")
    logprobs: int | None = Field(None, ge=0, description="Not supported (only null).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM extensions, and ours (off unless asked: plain completions block no n-grams).
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens (vLLM).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (vLLM).")
    no_repeat_ngram_size: int = Field(0, ge=0, le=32, description="Extension; 0: off.")

    _check_stop = field_validator("stop")(ChatCompletionRequest._check_stop.__func__)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and not isinstance(value[0], int):
            if len(value) != 1:
                raise ValueError(f"{len(value)} prompts given: one prompt per request is "
                                 "supported here")
            value = value[0]
        if isinstance(value, str):
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"at most {MAX_PROMPT_CHARS} characters")
        elif len(value) > MAX_PROMPT_TOKEN_IDS:
            raise ValueError(f"at most {MAX_PROMPT_TOKEN_IDS} token ids")
        if not value:
            raise ValueError("the prompt is empty")
        return value

    def unhonoured_fields(self) -> dict[str, object]:
        """Fields sent with a value this server does not act on: the unknown ones, and the
        known ones away from their no-op values."""
        fields = dict(self.model_extra or {})
        for name, no_op in (("n", 1), ("best_of", 1), ("logprobs", None),
                            ("frequency_penalty", 0), ("presence_penalty", 0)):
            value = getattr(self, name)
            if value is not None and value != no_op:
                fields[name] = value
        return fields


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


def _text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=_text_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    """One SSE chunk: a text delta, the finish reason (last chunk), or the usage (no choices)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


SummarizeStrategy = Literal["auto", "single"]


class SummarizeRequest(BaseModel):
    """The seed's summarize request, plus long-text strategy and streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)
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
    """A streamed step of a summary: a round began (``chunks_done`` 0) or one of its pieces
    is done. The round with ``final: true`` is the one call whose text is the summary."""

    object: Literal["summarize.progress"] = "summarize.progress"
    round: int = Field(description="1 for the pieces of the text, 2 for pieces of their "
                       "summaries, ...")
    chunks_done: int
    chunks_total: int = Field(description="Pieces in this round.")
    final: bool = Field(description="True for the last round: one call, whose text streams "
                        "as summarize.delta events.")


class SummarizeDelta(BaseModel):
    """New text of the final summary, as it is generated."""

    object: Literal["summarize.delta"] = "summarize.delta"
    delta: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thai-llm-serving"
    root: str | None = Field(None, description="Base model the adapter sits on, when it is a Hugging "
                             "Face hub id; null for a model loaded from a local folder (server paths "
                             "are never shown).")
    demo: bool = Field(False, description="True when serving the offline demo checkpoint.")
    max_model_len: int = Field(description="The context window in tokens (vLLM's field): prompt "
                               "plus completion must fit it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------- /tokenize, /detokenize (vLLM's)
MAX_DETOKENIZE_TOKENS = 131_072
MAX_TOKENIZE_CHARS = 1_000_000


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: either ``prompt`` (a plain text) or ``messages`` (a chat, through
    the same normalization and chat template as ``/v1/chat/completions``), not both.

    The two shapes are vLLM's ``TokenizeCompletionRequest`` and ``TokenizeChatRequest``; one
    strict model here so a body with both, or neither, is a clear 400 instead of whichever
    shape happened to validate.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name; checked when given.")
    prompt: str | None = Field(None, max_length=MAX_TOKENIZE_CHARS,
                               description="Text to tokenize (exclusive with messages).")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=512,
        description="Chat messages to tokenize with the chat template (exclusive with prompt).")
    add_generation_prompt: bool | None = Field(
        None, description="messages only: end with the assistant turn's header, as a chat "
        "completion does (default true).")
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (BOS, if it has one); default "
        "true for prompt, false for messages (the chat template has its own).")
    return_token_strs: bool = Field(False, description="Also return each token as a string.")

    @model_validator(mode="after")
    def _one_shape(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` (text) or `messages` (a chat)")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("`add_generation_prompt` applies to `messages` only")
        return self

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="Present when return_token_strs was set.")


class DetokenizeRequest(BaseModel):
    """vLLM's ``/detokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name; checked when given.")
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS,
                              description=f"Token ids, at most {MAX_DETOKENIZE_TOKENS}.")


class DetokenizeResponse(BaseModel):
    prompt: str


class UpstreamState(BaseModel):
    name: str = Field(description="upstream-N: the N-th URL of THAI_UPSTREAM_URLS, from 0.")
    healthy: bool
    outstanding: int = Field(description="Requests in progress on it.")
    seconds_in_state: float
    error: str | None = Field(None, description="Why it is down.")


class HealthResponse(BaseModel):
    """Open to anyone (probes need no key), so it names the model but shows no server path."""

    status: Literal["loading", "ok", "error"]
    model_loaded: bool
    model: str
    base_model: str | None = Field(None, description="The base model's Hugging Face hub id; null "
                                   "when it was loaded from a local folder.")
    adapter_loaded: bool = Field(False, description="Whether a LoRA adapter is applied.")
    demo: bool = False
    device: str | None = None
    dtype: str | None = None
    dtype_reason: str | None = Field(None, description="Why this dtype: set by THAI_DTYPE, or "
                                     "what auto found (e.g. native bf16 on this CPU).")
    memory_mb: float | None = Field(None, description="Model memory (GPU when on GPU, else process RSS).")
    uptime_s: float
    error: str | None = Field(None, description="Why the model cannot serve (server paths removed).")
    requests_running: int = 0
    requests_waiting: int = 0
    engine: Literal["local", "openai"] = Field(
        "local", description="local: the model runs in this process; openai: on upstream servers.")
    upstreams: list[UpstreamState] | None = Field(
        None, description="THAI_ENGINE=openai: each upstream server's state (named by position in "
        "THAI_UPSTREAM_URLS; its address is in /metrics, not here).")


class ReadinessResponse(BaseModel):
    """The readiness probe: ``ready`` is the only state that should get traffic."""

    status: Literal["ready", "loading", "draining", "failed", "stopped"]
    reason: str | None = Field(None, description="Why the server is not ready.")


class ServerInfo(BaseModel):
    name: str
    version: str
    model: str
    endpoints: dict[str, str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, used for every error the server returns."""

    error: ErrorDetail


JSONDict = Annotated[dict[str, Any], Field()]
