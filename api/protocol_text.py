"""Schemas of OpenAI's legacy text completions (``/v1/completions``, as vLLM serves them)
and vLLM's ``/tokenize`` and ``/detokenize``; the chat schemas and the sampling fields they
share are in :mod:`api.protocol`."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.protocol import (
    MAX_CHAT_MESSAGES,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    ChatTool,
    FinishReason,
    PromptLogprobs,
    SamplingFields,
    Usage,
    _OmitsExtras,
    check_json_input,
)

# ------------------------------------------------------------ /v1/completions (legacy)
MAX_PROMPT_CHARS = 1_000_000        # all prompts of a request together
MAX_PROMPT_TOKEN_IDS = 131_072      # all prompts of a request together
MAX_PROMPTS = 64                    # prompts in one request (prompts x n: see the serving)

Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    """OpenAI's legacy completion request as vLLM serves it.

    ``prompt`` is a text, a list of token ids, or a list of prompts (texts or token-id lists):
    each prompt gets ``n`` choices, indexed prompt by prompt (prompt i's choice j is
    ``i * n + j``), as OpenAI and vLLM index them. Unknown fields are refused by the serving
    layer (a 400 naming them), whichever the engine.
    """

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description=f"A text, a list of token ids, or a list of up to {MAX_PROMPTS} prompts "
        "(texts or token-id lists).")
    suffix: str | None = Field(None, description="Not supported (a 400 when given).")
    echo: bool = Field(False, description="Put the prompt before the completion (with "
                       "logprobs: the prompt's log probabilities too).")
    best_of: int | None = Field(None, ge=1, description="Only null or equal to n.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Return each "
                                 "token's log probability and this many alternatives.")
    no_repeat_ngram_size: int = Field(0, ge=0, le=32, description="Extension; 0: off.")

    @field_validator("prompt")
    @classmethod
    def _check_prompts(cls, value: Any) -> Any:
        batch = isinstance(value, list) and bool(value) and not isinstance(value[0], int)
        prompts = value if batch else [value]
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts given: at most {MAX_PROMPTS} per request")
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        ids = sum(len(p) for p in prompts if not isinstance(p, str))
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"at most {MAX_PROMPT_CHARS} characters of prompt")
        if ids > MAX_PROMPT_TOKEN_IDS:
            raise ValueError(f"at most {MAX_PROMPT_TOKEN_IDS} prompt token ids")
        if not prompts or any(not p for p in prompts):
            raise ValueError("the prompt is empty")
        return value

    def prompts(self) -> list[Prompt]:
        """Every prompt of the request, in order (one for a single text or id list)."""
        value = self.prompt
        if isinstance(value, list) and value and not isinstance(value[0], int):
            return list(value)
        return [value]


class CompletionLogprobs(BaseModel):
    """The legacy completions' log probabilities, one entry per token (prompt tokens first
    with ``echo``; the prompt's first token has no log probability)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_OmitsExtras):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="With prompt_logprobs "
                                                   "(vLLM).")
    prompt_token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM; "
                                               "streamed: on the choice's first chunk).")
    token_ids: list[int] | None = Field(None, description="With return_token_ids (vLLM).")


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
        None, min_length=1, max_length=MAX_CHAT_MESSAGES,
        description="Chat messages to tokenize with the chat template (exclusive with prompt).")
    add_generation_prompt: bool | None = Field(
        None, description="messages only: end with the assistant turn's header, as a chat "
        "completion does (default true).")
    tools: list[ChatTool] | None = Field(None, max_length=128, description="messages only: the "
                                           "tools, rendered by the template as a chat "
                                           "completion with them is.")
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (BOS, if it has one); default "
        "true for prompt, false for messages (the chat template has its own).")
    return_token_strs: bool = Field(False, description="Also return each token as a string.")
    continue_final_message: bool = Field(False, description="messages only: end with the last "
                                         "message open, as a chat completion continuing it "
                                         "does (vLLM); needs add_generation_prompt: false.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, max_length=64, description="messages only: variables for the chat template, as "
        "in a chat completion (vLLM).")

    @model_validator(mode="after")
    def _one_shape(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` (text) or `messages` (a chat)")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise ValueError("`add_generation_prompt` applies to `messages` only")
        if self.prompt is not None and self.tools is not None:
            raise ValueError("`tools` applies to `messages` only")
        if self.prompt is not None and (self.continue_final_message
                                        or self.chat_template_kwargs is not None):
            raise ValueError("`continue_final_message` and `chat_template_kwargs` apply to "
                             "`messages` only")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false, as "
                             "in vLLM")
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
