"""Plain data that crosses the engine boundary."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match, as the request gave it (hashable: the compile cache's key).

    ``value``: the JSON schema as JSON text (``json_schema``), a regular expression
    (``regex``), a JSON list of the allowed strings (``choice``), a Lark grammar in
    llguidance's dialect (``lark``: ``guided_grammar`` and forced tool calls), nothing for
    ``json_object``.
    """

    kind: GrammarKind
    value: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request; honoured per sequence inside a batch.

    Every field's default is "off" except the original design's summarization defaults (150 tokens,
    no repeated 3-grams); each serving route sets what its clients expect (the OpenAI
    routes turn n-gram blocking off). Names and meanings follow vLLM's ``SamplingParams``.
    """

    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    no_repeat_ngram_size: int = 3
    top_k: int = 0                           # 0: off
    min_p: float = 0.0                       # 0: off
    frequency_penalty: float = 0.0           # OpenAI: minus penalty x count in the output
    presence_penalty: float = 0.0            # OpenAI: minus penalty once a token is in the output
    repetition_penalty: float = 1.0          # vLLM/HF: prompt and output tokens, 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()     # finish ("stop") on these as on EOS
    include_stop_str_in_output: bool = False
    logprobs: int | None = None              # None: none; k: the chosen token's and the top k
    prompt_logprobs: int | None = None       # the same for every prompt token after the first
    grammar: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def penalized(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)


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
    ``tenant``: who the work is for (:mod:`api.engine.tenants`): the local engine admits
    tenants in turn and bounds the anonymous UI's share of the batch. ``priority``: vLLM's
    field, lower sooner, ordering only this tenant's own waiting requests.
    ``model``: the served model name the request picked, which says which LoRA adapter runs
    (one of :meth:`~api.engine.base.Engine.served_models`; None: the served model itself).
    How the adapter is applied (merged, or per row) is the engine's business.
    """

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[dict[str, str]] | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    plain_prompt: bool = False
    tenant: str = "local"
    priority: int = 0
    model: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated (or prompt) token's log probability under the model (before any
    penalty, bias, mask or temperature: vLLM's default ``raw_logprobs``), and the ``top``
    most likely tokens at that position as (token id, log probability), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    # With ``logprobs``: the tokens generated since the previous chunk (token-aligned, so a
    # Thai character split over two tokens has two entries while its text comes once).
    logprobs: tuple[TokenLogprob, ...] = ()
    # With ``prompt_logprobs``, on the first chunk: the prompt's tokens (the first has none).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # The ids of the tokens generated since the previous chunk (EOS or a stop token included:
    # as many in all as completion_tokens); empty from an engine that relays only text.
    token_ids: tuple[int, ...] = ()
