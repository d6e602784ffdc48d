"""Schemas of OpenAI's Responses API (``/v1/responses``), in the openai SDK's shapes
(``openai.types.responses``) as vLLM's ``protocol.py`` serves them.

The request keeps ``input`` items, ``tools`` and ``text.format`` as JSON objects: their
many kinds (messages, function calls and outputs, hosted tools, images, files) are read
one by one in :mod:`api.serving.responses`, so what is not supported is a 400 naming the
item and its kind rather than a long schema error about the union's members.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.protocol import MAX_PRIORITY, MAX_TOP_K, check_json_input

MAX_INPUT_ITEMS = 512
MAX_INPUT_CHARS = 1_000_000
MAX_INSTRUCTIONS_CHARS = 1_000_000


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``. Undeclared fields are a 400 naming them; declared fields
    that would change the output in a way this server cannot honour (hosted tools,
    reasoning effort, background runs, images, files) are a 400 naming them too."""

    # strict: a wrong JSON type is a 400, not coerced; extra: refused by the serving layer
    # with the field's name (rather than silently dropped).
    model_config = ConfigDict(extra="allow", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name.")
    input: (Annotated[str, Field(max_length=MAX_INPUT_CHARS)]
            | Annotated[list[dict[str, Any]], Field(max_length=MAX_INPUT_ITEMS)]) = Field(
        description="A text (one user message) or a list of items: messages (role user, "
        "system, developer or assistant; content a string or input_text/output_text parts), "
        "function_call and function_call_output items.")
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS,
                                     description="A system message put first; not carried "
                                     "over by previous_response_id (OpenAI's rule).")
    max_output_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Extension (vLLM).")
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="Extension (vLLM).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Extension (vLLM).")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Extension (vLLM).")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Extension (vLLM): "
                          "orders this caller's own waiting requests. Local engine only.")
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description="Function tools ({type: function, name, description, "
        "parameters, strict}); hosted tools (web_search, file_search, computer, ...) are a 400.")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="none, auto, required or {type: function, name}.")
    parallel_tool_calls: bool | None = Field(None, description="Whether one answer may hold "
                                             "several calls (default true).")
    text: dict[str, Any] | None = Field(
        None, description="{format: {type: text | json_object | json_schema, ...}}: the output "
        "is constrained by the same grammar as chat's response_format.")
    stream: bool = Field(False, description="Typed SSE events (response.created, "
                         "response.output_text.delta, ..., response.completed).")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted: "
                                                  "include_obfuscation (no obfuscation is sent).")
    previous_response_id: str | None = Field(None, max_length=128, description="Continue "
                                             "from a stored response of the same API key.")
    store: bool | None = Field(None, description="Keep the response for GET and "
                               "previous_response_id (default: when THAI_RESPONSES_STORE_SIZE > 0).")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Echoed back.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, max_length=256, description="Accepted (prefix "
                                         "caching is automatic here).")
    service_tier: str | None = Field(None, max_length=32, description="Accepted: one tier here.")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="disabled only: a "
                                                            "prompt over the context is a 400.")
    reasoning: dict[str, Any] | None = Field(None, description="Only without an effort or "
                                             "summary (or effort none): this model does not reason.")
    background: bool | None = Field(None, description="Only false.")
    include: list[str] | None = Field(None, max_length=16, description="Only items that add "
                                      "nothing here (reasoning.encrypted_content).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only 0.")
    max_tool_calls: int | None = Field(None, ge=1, description="Accepted: it bounds hosted "
                                       "tools, and none are served here.")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """OpenAI's ``Response`` object."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputMessage | FunctionCallItem] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["auto", "disabled"] = "disabled"
    previous_response_id: str | None = None
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    background: bool = False
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
