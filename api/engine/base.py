"""The engine interface that routes and the UI depend on.

A request goes in (prompt token ids and sampling parameters); an async stream
of :class:`GenerationChunk` comes out, the last one carrying the finish reason
and token counts. Implementations: :class:`~api.engine.transformers_engine.TransformersEngine`
(the real model, continuously batched) and test doubles.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from api.engine.errors import AdapterError, ContextLengthExceededError
from api.engine.types import GenerationChunk, GenerationRequest, GrammarSpec


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServedModel:
    """One name requests may use: the served model, the base without adapter, or an adapter
    (``parent``: the base's name, vLLM's model card field)."""

    name: str
    parent: str | None = None
    kind: str = "model"  # model (the served one), base, adapter


@dataclass
class EngineInfo:
    """What is loaded and where; filled in once loading has finished."""

    model_name: str
    base_model: str | None = None
    adapter: str | None = None
    demo: bool = False
    device: str | None = None
    dtype: str | None = None
    dtype_reason: str | None = None  # why this dtype (auto picks by hardware)
    quantization: str | None = None  # what runs: none, int8, w8a8, 8bit, 4bit
    quantization_reason: str | None = None  # why (auto measures w8a8's quality cost)
    engine: str = "local"  # THAI_ENGINE: local (this process) or openai (upstream servers)
    max_context: int = 4096
    max_batch_size: int = 1
    created: int = field(default_factory=lambda: int(time.time()))


def chat_prompt_ids(tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None, continue_final_message: bool = False,
                    template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat template applied to ``messages`` (and the ``tools`` the model
    may call, which the template renders in its system turn), generation prompt added;
    ``continue_final_message`` leaves the last message open (an assistant prefill), and
    ``template_kwargs`` are variables for the template (vLLM's ``chat_template_kwargs``)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                        tools=list(tools) if tools else None,
                                        tokenize=True, return_dict=False,
                                        **_template_options(continue_final_message, template_kwargs))
    return list(ids)


def _template_options(continue_final_message: bool, template_kwargs: dict | None) -> dict:
    """The optional template arguments, only when set (the defaults render as before)."""
    options = dict(template_kwargs or {})
    if continue_final_message:
        options["continue_final_message"] = True
    return options


def chat_template_ids(tokenizer, messages: Sequence[dict], *,
                      add_generation_prompt: bool = True,
                      add_special_tokens: bool = False,
                      tools: Sequence[dict] | None = None,
                      continue_final_message: bool = False,
                      template_kwargs: dict | None = None) -> list[int]:
    """The chat template's ids as ``/tokenize`` makes them (vLLM: the template rendered to
    text, then tokenized with ``add_special_tokens``). Without special tokens, the very ids
    :func:`chat_prompt_ids` gives a chat completion."""
    if not add_special_tokens:
        return chat_prompt_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                               tools=tools, continue_final_message=continue_final_message,
                               template_kwargs=template_kwargs)
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None, tokenize=False,
                                         **_template_options(continue_final_message, template_kwargs))
    return list(tokenizer.encode(text, add_special_tokens=True))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character a byte-level BPE vocabulary
    (Qwen's) writes for each byte, to that byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """Each token's own bytes (what OpenAI's logprobs ``bytes`` carry): a Thai character
    split over two tokens gives each its part, which no text decoding of one token can.
    Added and special tokens (``<|im_end|>``) are their text in UTF-8."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    added = getattr(tokenizer, "added_tokens_encoder", {})
    out = []
    for piece in pieces:
        piece = piece or ""
        if piece in added or any(ch not in _BYTE_DECODER for ch in piece):
            out.append(piece.encode("utf-8"))
        else:
            out.append(bytes(_BYTE_DECODER[ch] for ch in piece))
    return out


def tokenizer_vocab_size(tokenizer) -> int:
    """Every id the tokenizer can decode: the base vocabulary and the added tokens."""
    return len(tokenizer)


def check_context(max_context: int, prompt_tokens: int, max_tokens: int) -> None:
    """Refuse a request whose prompt plus requested output does not fit the window."""
    if max_context - prompt_tokens < max_tokens:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_context} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.")


class GenerationStream(abc.ABC):
    """One request's chunks, as :meth:`Engine.generate` returns them.

    Iterate it for :class:`GenerationChunk` values; closing it (``aclose``), even
    before the first chunk, cancels the generation.
    """

    def __aiter__(self) -> "GenerationStream":
        return self

    @abc.abstractmethod
    async def __anext__(self) -> GenerationChunk: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def wait_open(self) -> None:
        """Return once the generation has really started.

        A streaming response awaits this before sending its status line: an engine
        whose admission finishes asynchronously (an upstream server answering 429 or
        503) raises here, so the client gets that status instead of a 200 stream that
        ends in an error. The local engine admits in ``generate`` and returns at once.
        """


class Engine(abc.ABC):
    """Owns the model; every generation in the process goes through it."""

    info: EngineInfo
    state: EngineState = EngineState.LOADING
    error: str | None = None
    started_at: float = 0.0

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin loading in the background and return at once."""

    async def wait_ready(self, timeout: float | None = None) -> None:  # pragma: no cover - optional
        """Wait until loading finished (ready or failed)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel running work and release the model."""

    @abc.abstractmethod
    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """Token ids of the chat template applied to ``messages`` and ``tools`` (generation
        prompt added)."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer makes of ``text``."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Admit ``request`` and return its stream of chunks.

        Admission errors (not ready, overloaded, context too long) raise here,
        synchronously, so the caller can answer with the right status before
        streaming; leaving the iteration early cancels the generation.
        """

    # ------------------------------------------------- /tokenize, /detokenize
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a plain ``text`` (``add_special_tokens``: BOS and the like, if the
        tokenizer has any)."""
        raise NotImplementedError(f"{type(self).__name__} cannot tokenize plain text")

    def encode_messages(self, messages: Sequence[dict], *,
                        add_generation_prompt: bool = True,
                        add_special_tokens: bool = False,
                        tools: Sequence[dict] | None = None,
                        continue_final_message: bool = False,
                        template_kwargs: dict | None = None) -> list[int]:
        """The chat template's ids with the ``/tokenize`` options (and a chat completion's
        template options); the defaults give :meth:`encode_chat`'s ids (what a chat
        completion's usage counts)."""
        if (add_generation_prompt and not add_special_tokens and not continue_final_message
                and not template_kwargs):
            return self.encode_chat(messages, tools)
        raise NotImplementedError(f"{type(self).__name__} supports only the default chat "
                                  "tokenization options")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ``ids`` (each within ``range(vocab_size)``; callers check)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode token ids")

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's bytes (log probabilities name their tokens with them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot name tokens")

    async def check_grammar(self, spec: GrammarSpec) -> None:
        """Raise GrammarError (a 400) for a structured-output spec this engine cannot
        enforce; compiles and caches it otherwise. An engine whose upstream enforces the
        spec itself has nothing to check here."""

    @property
    def vocab_size(self) -> int:
        """How many token ids exist (``0 .. vocab_size - 1``), added tokens included."""
        raise NotImplementedError(f"{type(self).__name__} has no vocabulary size")

    def worker_error(self) -> BaseException | None:
        """What killed the engine's worker after loading, if anything did."""
        return None

    def current_state(self) -> EngineState:
        """The state, ERROR too once the worker died after loading (readiness and health use it)."""
        if self.state is EngineState.READY and self.worker_error() is not None:
            return EngineState.ERROR
        return self.state

    def failure(self) -> str | None:
        """Why the engine cannot serve any more (load failure or a dead worker), else None."""
        dead = self.worker_error()
        if dead is not None:
            return f"engine worker died: {dead!r}"
        if self.state is EngineState.ERROR:
            return self.error or "engine failed"
        return None

    def stats(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return 0, 0

    # ------------------------------------------------------ models and adapters
    def served_models(self) -> list[ServedModel]:
        """The names a request's ``model`` may give, the served model first."""
        return [ServedModel(self.info.model_name)]

    def serves(self, name: str | None) -> bool:
        """Whether ``name`` (None: the served model) picks something this engine runs."""
        return name is None or any(m.name == name for m in self.served_models())

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter at run time under ``name`` (raises AdapterError and the like)."""
        raise AdapterError(f"{type(self).__name__} cannot load adapters at run time")

    async def unload_adapter(self, name: str) -> None:
        """Unload the run-time or start-up adapter ``name``; refuses while requests use it."""
        raise AdapterError(f"{type(self).__name__} cannot unload adapters at run time")

    def memory_mb(self) -> float | None:
        return None

    def upstream_states(self) -> list[dict] | None:
        """Each upstream server's state, for an engine that sends work elsewhere; else None."""
        return None

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY
