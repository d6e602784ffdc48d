"""Plain data that crosses the engine boundary."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request; honoured per sequence inside a batch."""

    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    no_repeat_ngram_size: int = 3

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class GenerationRequest:
    """A tokenized prompt and its sampling parameters.

    The local engine reads ``prompt_ids``. An engine that hands the work to another
    OpenAI-compatible server sends ``messages`` (the chat the prompt was made from,
    after our normalization) and ``passthrough`` (request fields this server does not
    act on itself, e.g. vLLM's ``repetition_penalty``, which that server may honour);
    ``prompt_ids`` still serve for context checks and as a fallback token count.
    ``plain_prompt``: the ids are a plain prompt (``/v1/completions``), not a chat's
    template; an upstream engine sends them as the ``prompt`` of its own ``/v1/completions``.
    """

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[dict[str, str]] | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    plain_prompt: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    """One piece of a generation: new text, and on the last chunk the totals.

    ``text`` may be empty (a token that completes no character yet); the last
    chunk has ``finished=True`` and a ``finish_reason`` of ``stop`` or ``length``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: BaseException | None = None
