"""Request and response schemas: the OpenAI chat API, health and model listing (the
summarize API's are in :mod:`api.protocol_summarize`, text completions' and the tokenizer's in
:mod:`api.protocol_text`).

Validation lives here (``Field(ge=..., le=...)``), so routes and the serving
layer receive values that are already within bounds, and ``/docs`` shows every
field with its limits.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_STOP_SEQUENCES = 8


class TextPart(BaseModel):
    """One text part of a message content list (OpenAI's multi-part content)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = "text"
    text: str = Field(max_length=1_000_000)


# Content part types of OpenAI's and vLLM's chat API that carry something other than text.
NON_TEXT_PARTS = frozenset({"image_url", "image", "input_image", "image_pil", "image_embeds",
                            "input_audio", "audio_url", "audio", "video_url", "video", "file",
                            "input_file"})


def _text_parts(value: Any) -> Any:
    """A content list's parts must be text: an image or audio part is refused with the
    reason (this model reads text) instead of a schema error about a missing ``text``."""
    if not isinstance(value, list):
        return value
    for i, part in enumerate(value):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            continue  # not a part at all: the schema's own error says so
        if kind in NON_TEXT_PARTS:
            raise ValueError(f"content part {i} is of type {kind!r}: this model reads text "
                             "only (no images, audio, video or files)")
        if kind != "text":
            raise ValueError(f"content part {i} has unknown type {kind[:64]!r}; only 'text' "
                             "parts are supported")
    return value


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=1_000_000, description="The arguments as JSON text.")


class ToolCall(BaseModel):
    """A call the assistant made (in a response, or sent back in the history)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Who wrote the message; 'developer' is treated as 'system'; 'tool' carries "
        "a tool's result back (with tool_call_id)."
    )
    content: str | list[TextPart] | None = Field(
        None, description="A string, or a list of text parts that are joined (text only: image "
        "and audio parts get HTTP 400)."
    )
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=64, description="assistant messages: the calls it made.")
    tool_call_id: str | None = Field(None, max_length=256,
                                     description="tool messages: the call this answers.")

    _parts = field_validator("content", mode="before")(_text_parts)

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id belongs to tool messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    # forbid: any other option is a 400 naming it
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")
    continuous_usage_stats: bool = Field(False, description="Put the usage so far on every "
                                         "chunk (vLLM).")


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



MAX_CHAT_MESSAGES = 16_384  # a sanity bound: THAI_MAX_MESSAGES, the window and the bytes bound first
MAX_CHOICES = 16          # n: choices generated (as that many sequences) per request
MAX_TOP_LOGPROBS = 20     # OpenAI's bound for top_logprobs (vLLM's default max_logprobs)
MAX_LOGIT_BIAS = 1024     # entries of logit_bias
MAX_STOP_TOKEN_IDS = 64
MAX_PRIORITY = 100        # |priority|: orders a caller's own requests (vLLM's field)
MAX_TOP_K = 1 << 20       # above any vocabulary: a larger top_k would mean the same as -1


def _check_stop(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s for s in stops) or any(len(s) > 256 for s in stops):
        raise ValueError("stop sequences must be 1 to 256 characters")
    return stops


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field("response", max_length=256)
    description: str | None = Field(None, max_length=100_000)
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON schema the "
                                        "output must match.")
    strict: bool | None = Field(None, description="Accepted; the output always matches the "
                                "schema here (grammar-constrained), strict or not.")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON
    object) or ``json_schema`` (JSON matching ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (its newer name for the guided_* fields): exactly one."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, max_length=10_000)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, max_length=100_000)
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """The sampling and output fields chat and text completions share: OpenAI's, plus
    vLLM's extensions (top_k, min_p, repetition_penalty, stop_token_ids,
    include_stop_str_in_output, min_tokens, ignore_eos, the guided_* fields)."""

    # strict: a wrong JSON type (false for a number, "5" for an integer) is a 400, not coerced.
    model_config = ConfigDict(extra="allow", strict=True)
    _valid_input = model_validator(mode="before")(check_json_input)

    model: str | None = Field(None, max_length=256, description="Served model name.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default: "
                                   "the rest of the context window, at most THAI_MAX_TOKENS_LIMIT "
                                   "and within THAI_MAX_OUTPUT_TOKENS_PER_REQUEST (n x max_tokens) "
                                   "and THAI_MAX_LOGPROB_ENTRIES.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description=f"Choices to generate (at most {MAX_CHOICES}).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, -100 to 100.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored (an "
                             "end-user id for abuse monitoring; nothing here uses it).")
    response_format: ResponseFormat | None = None
    # vLLM extensions.
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="Sample from the k most "
                              "likely tokens; 0 or -1: all (vLLM).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens less likely than "
                                "min_p times the most likely one (vLLM).")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="Divide the "
                                             "logits of tokens already in the prompt or output "
                                             "(vLLM); 1: off.")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="Token ids that end generation (vLLM).")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string or stop "
                                             "token at the end of the text (vLLM).")
    min_tokens: int = Field(0, ge=0, description="Generate at least this many tokens (vLLM).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (vLLM).")
    guided_json: dict[str, Any] | str | None = Field(None, description="JSON schema the output "
                                                     "must match (vLLM).")
    guided_regex: str | None = Field(None, max_length=10_000, description="Regex the output "
                                     "must match (vLLM).")
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1024,
                                            description="The output is one of these (vLLM).")
    guided_grammar: str | None = Field(None, max_length=100_000, description="A Lark grammar "
                                       "(llguidance's dialect) the output must match (vLLM).")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's newer form "
                                                         "of the guided_* fields.")
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Lower is sooner "
                          "(vLLM): orders this caller's own waiting requests; other callers "
                          "are served in turn whatever their priority. Local engine only.")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Return "
                                        "each prompt token's log probability and this many "
                                        "alternatives (vLLM's shape; not with stream). Local "
                                        "engine only.")
    return_token_ids: bool | None = Field(None, description="Also return the prompt's and each "
                                          "choice's token ids (vLLM: prompt_token_ids, "
                                          "token_ids). Local engine only.")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="Keep only the "
                                               "prompt's last k tokens; -1: as many as the "
                                               "context window holds (vLLM).")

    _stop = field_validator("stop")(_check_stop)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options applies only with stream: true (as in vLLM)")
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not available with stream: true (as in vLLM)")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 12:
                raise ValueError(f"logit_bias keys are token ids, not {key[:32]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are -100 to 100, not {bias}")
        return value

    # What either engine accepts is this schema (and its subclasses'): a field it does not
    # declare is a 400 naming it (ServingBase.check_openai_fields), with the local engine and
    # with an upstream one alike, so a vLLM behind THAI_ENGINE=openai never sees best_of,
    # prompt_logprobs, chat_template, logits_processors or lora_request from a client
    # (priority is declared: it orders a tenant's own requests in the local engine, and is a
    # 400 with an upstream one, where it would reorder everyone's). Of the declared fields, these are the ones an upstream engine receives as the
    # client sent them (the local engine honours each through SamplingParams; each is bounded
    # above); the sampling core (max_tokens, temperature, top_p, stop, seed, min_tokens,
    # ignore_eos) goes through SamplingParams to either engine.
    PASSED_ON: ClassVar[tuple[str, ...]] = (
        "frequency_penalty", "presence_penalty", "logit_bias", "response_format", "top_k",
        "min_p", "repetition_penalty", "stop_token_ids", "include_stop_str_in_output",
        "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
        "no_repeat_ngram_size", "truncate_prompt_tokens")

    def passthrough_fields(self) -> dict[str, object]:
        """What an upstream engine sends on besides our sampling: the fields of
        :attr:`PASSED_ON` that the client set, as validated here. Never an undeclared field:
        those are refused before a request reaches either engine."""
        return {name: self.model_dump(by_alias=True, include={name})[name]
                for name in self.PASSED_ON if name in self.model_fields_set}

    def unknown_fields(self) -> list[str]:
        """The fields the client sent that this schema does not declare (each one a 400)."""
        return list((self.model_extra or {}).keys())


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"] = "function"
    function: "FunctionDefinition"


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="a-z, A-Z, 0-9, _ . - "
                      "(OpenAI's rule), at most 64 characters.")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments.")
    strict: bool | None = Field(None, description="Accepted; forced calls always match the "
                                "schema here.")


class NamedToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


ChatTool.model_rebuild()


class ChatCompletionRequest(SamplingFields):
    """OpenAI's chat completion request, plus vLLM's extensions (see SamplingFields)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Same as max_tokens (newer OpenAI name); wins when both are set."
    )
    logprobs: bool = Field(False, description="Return each output token's log probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="With logprobs: the most likely alternatives "
                                     "at each position.")
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without.")
    parallel_tool_calls: bool | None = Field(None, description="Whether several calls may "
                                             "come in one answer (default true).")
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=32, description="Extension: block "
                                             "repeated n-grams; 0 (default here): off.")
    # vLLM's chat template options.
    add_generation_prompt: bool = Field(True, description="End the prompt with the assistant "
                                        "turn's header (vLLM); false with continue_final_message.")
    continue_final_message: bool = Field(False, description="Continue the last message (an "
                                         "assistant prefill) instead of starting a new turn "
                                         "(vLLM); needs add_generation_prompt: false.")
    echo: bool = Field(False, description="Put the last message's content before the reply when "
                       "it is the assistant's (with continue_final_message: the prefill) (vLLM).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, max_length=64, description="Variables for the chat template (vLLM), e.g. "
        "enable_thinking; its own options (add_generation_prompt, continue_final_message) only "
        "when they agree with the request's fields; chat_template and the tokenizer's "
        "arguments get HTTP 400.")
    # An upstream engine applies its own chat template: it gets the template options too.
    PASSED_ON: ClassVar[tuple[str, ...]] = SamplingFields.PASSED_ON + (
        "chat_template_kwargs", "add_generation_prompt", "continue_final_message")
    # OpenAI's fields that carry no instruction for generation.
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Accepted; no "
                                            "effect (OpenAI stores it with stored completions, "
                                            "which this server does not keep).")
    store: bool | None = Field(None, description="false (or null) accepted; true gets HTTP 400: "
                               "this server keeps no completions to retrieve.")
    service_tier: Literal["auto", "default"] | None = Field(
        None, description="auto or default accepted (one tier here); flex, scale and priority "
        "get HTTP 400.")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value

    @model_validator(mode="after")
    def _chat_rules(self) -> "ChatCompletionRequest":
        if self.store:
            raise ValueError("store: true is not supported: this server keeps no completions "
                             "to retrieve later (send false or leave it out)")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false (the "
                             "last message is continued, no new turn begins), as in vLLM")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message continues the last message, which must "
                             "be the assistant's")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tool function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is "
                             "not among the tools")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class _OmitsExtras(BaseModel):
    """A response with vLLM's optional extras: each is left out of the JSON unless it was
    asked for (None), so the plain OpenAI shape stays what it was."""

    EXTRAS: ClassVar[frozenset[str]] = frozenset({"prompt_logprobs", "prompt_token_ids",
                                                  "token_ids"})

    @model_serializer(mode="wrap")
    def _drop_extras(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.EXTRAS}


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one prompt token's (or alternative's) log probability."""

    logprob: float
    rank: int | None = Field(None, description="1 for the most likely token; null for a "
                             "prompt token that is not among the top_logprobs asked for.")
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, token id -> its entry (None for the first token)
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatCompletionChoice(_OmitsExtras):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: ChatFinishReason
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM).")


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(_OmitsExtras):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="With prompt_logprobs (vLLM).")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM).")


class _DropsNone(BaseModel):
    """A streamed delta's part: absent fields are left out of the JSON, as OpenAI does."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DropsNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropsNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_DropsNone):
    """A streamed delta; absent fields are left out of the JSON, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionChunkChoice(_OmitsExtras):
    index: int = 0
    delta: DeltaMessage
    finish_reason: ChatFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_OmitsExtras):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids, on the "
                                               "first chunk (vLLM).")


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
    parent: str | None = Field(None, description="For a LoRA adapter served as a model, the "
                               "base model's name (vLLM's field); null for a base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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
    quantization: str | None = Field(None, description="What runs: none, int8, w8a8 (CPU), 8bit or "
                                     "4bit (bitsandbytes); THAI_QUANTIZATION=auto resolved.")
    quantization_reason: str | None = Field(None, description="Why: set by THAI_QUANTIZATION, or "
                                            "what auto measured (w8a8's KL on a Thai text).")
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


def __getattr__(name: str) -> Any:
    """The text-completion and tokenizer schemas live in :mod:`api.protocol_text`; old
    imports of them from here still work."""
    from api import protocol_text

    try:
        return getattr(protocol_text, name)
    except AttributeError:
        raise AttributeError(f"module 'api.protocol' has no attribute {name!r}") from None
