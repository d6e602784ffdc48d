"""Grammar-constrained decoding: structured output that is valid by construction.

A request's :class:`GrammarSpec` (a JSON schema, ``json_object``, a regex, a list of
choices, a Lark grammar) becomes an llguidance grammar once; every sequence that uses it
gets its own matcher, which the sampler asks for a token mask each step (tokens that
cannot continue a valid output get ``-inf`` before sampling) and tells which token was
picked. A sequence therefore cannot produce text the grammar rejects; the only way out
is ``max_tokens`` (``finish_reason: length``), as with vLLM.

Why llguidance (measured against xgrammar 0.2.8 in ``bench/grammar_backends.py``): no
compile step to wait for (its lexer is built lazily, so a new schema costs milliseconds,
not a compile that stalls the batch), a mask in tens of microseconds, no dependency (a
Rust wheel; xgrammar pulls triton and a TVM runtime), and clear errors for schemas it
cannot handle, which become 400s.

Compile cache: the first matcher made for a spec is kept (LRU) and each sequence gets a
``deep_copy`` of it, which shares the compiled lexer and grammar.

Closing before the limit: a grammar says what may come next, not when to stop, and a
number's digits or a string's characters can go on until ``max_tokens`` cuts the JSON in
half (a small model does that: a random-weight one always). So in a constrained
sequence's last :data:`CLOSE_WITHIN` tokens the sampler prefers, among the tokens the
grammar allows, those made only of ``"`` ``}`` ``]`` (then those that add ``,``): open
strings, numbers, arrays and objects close, and the output ends valid. Far from the
limit nothing changes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from api.engine.errors import GrammarError
from api.engine.types import GrammarSpec

# Compact JSON: a small model given free whitespace spends its tokens on "\n\t \r"
# (seen with the demo checkpoint); the client's schema may still ask otherwise
# through llguidance's "x-guidance" options.
JSON_DEFAULTS = {"whitespace_flexible": False}
CACHE_SIZE = 256
CLOSE_WITHIN = 48            # tokens before the limit where closing tokens are preferred
CLOSE_BIAS = 1e4             # added to allowed closing tokens' logits: they always win
CLOSERS, SEPARATORS = frozenset(b'"}]'), frozenset(b'"}],')


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec`` (raises GrammarError for a malformed one)."""
    import llguidance

    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_DEFAULTS)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_DEFAULTS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        if spec.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.value)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}")


class GrammarCompiler:
    """Specs to matchers for one tokenizer, with the compile cache and a thread pool for
    computing many rows' masks at once (llguidance releases the GIL)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.vocab_size = vocab_size
        # Wrapping a 150k-token tokenizer takes about a second: done once, on first use.
        self.tokenizer_info = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.executor = llguidance.LLExecutor()
        self.closing_bias = self._closing_bias(vocab_size)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _prototype(self, spec: GrammarSpec) -> Any:
        with self._lock:
            proto = self._cache.get(spec)
            if proto is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return proto
        text = grammar_text(spec)
        error = self._llg.LLMatcher.validate_grammar(text, self.tokenizer_info)
        if error:
            raise GrammarError(error_line(error))
        proto = self._llg.LLMatcher(self.tokenizer_info, text, log_level=0)
        if proto.is_error():
            raise GrammarError(error_line(proto.get_error()))
        with self._lock:
            self.misses += 1
            self._cache[spec] = proto
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto

    def _closing_bias(self, vocab_size: int) -> torch.Tensor:
        """Per token: CLOSE_BIAS for tokens of only ``"}]``, half for those that also have
        ``,``, 0 for the rest (see the module's docstring)."""
        bias = torch.zeros(vocab_size)
        for token in range(min(vocab_size, self.tokenizer_info.vocab_size)):
            if self.tokenizer_info.is_special_token(token):
                continue
            piece = self.tokenizer_info.decode_bytes([token])
            if not piece or not set(piece) <= SEPARATORS:
                continue
            bias[token] = CLOSE_BIAS if set(piece) <= CLOSERS else CLOSE_BIAS / 2
        return bias

    def check(self, spec: GrammarSpec) -> None:
        """Raise GrammarError if ``spec`` cannot be used (compiles and caches it otherwise)."""
        self._prototype(spec)

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh matcher for one sequence."""
        return self._prototype(spec).deep_copy()

    def fill_masks(self, matchers: Sequence[Any]) -> torch.Tensor:
        """The allowed-token bitmask of each matcher, [len(matchers), ceil(vocab/32)] int32."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        else:
            self.executor.unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), words * 4,
                len(matchers))
        return bitmask


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[i, t]`` to -inf where bit ``t`` of ``bitmask[i]`` is 0, in place.

    llguidance's own helper is ``torch.compile``d (a C++ toolchain and seconds of warm-up
    on the first request); unpacking the bits is one vectorised shift here.
    """
    vocab = logits.shape[-1]
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(bitmask.shape[0], -1)
    width = min(vocab, allowed.shape[1])
    logits[:, :width].masked_fill_(allowed[:, :width] == 0, float("-inf"))
    if vocab > width:  # model rows past the tokenizer's: never allowed
        logits[:, width:] = float("-inf")


def error_line(error: str) -> str:
    """llguidance's message without its parser-state dump (``<state>``, ``<grammar>``:
    it quotes the whole grammar), on one line."""
    lines = []
    for line in error.strip().splitlines():
        if line.lstrip().startswith(("<state>", "<grammar>")):
            break
        if line.strip() and not set(line.strip()) <= {"^"}:
            lines.append(line.strip())
    return (" ".join(lines) or "invalid grammar")[:1000]
