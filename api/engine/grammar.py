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
string's characters or a number's digits can go on until ``max_tokens`` cuts the JSON in
half (a weak model does that; a random-weight one always). So each constrained sequence
has a :class:`Closer`: from :data:`CLOSE_WITHIN` tokens before its limit it keeps a
*closing plan*, the tokens that take the matcher from where it is to an accepting state
(found by walking a copy of the matcher: inside a string its closing quote, then the
innermost open containers, required keys with their shortest values; see
:meth:`GrammarCompiler.closing_plan`). Each step the sampled token is kept when a plan still
fits the tokens left after it; otherwise the plan's next token is taken instead. The output
therefore ends accepted by the grammar whenever the budget held a plan when the window
opened; when it did not, nothing is forced and the reply ends cut, ``finish_reason:
length``, as it would without the rule.

Strict objects: llguidance, like JSON Schema, lets an object have keys its schema never
declared unless ``additionalProperties`` says otherwise (it has no option for this; its
``JsonCompileOptions`` are separators, whitespace, ``coerce_one_of``, ``lenient`` and
escapes). A weak model then writes invented keys until the cut. :func:`strict_schema`
adds ``additionalProperties: false`` to every object schema that does not say, which is
what vLLM's default backend does (xgrammar's strict mode); a schema that allows extra keys
(``true`` or a schema) keeps them.
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
CLOSE_WITHIN = 64            # tokens before the limit where a closing plan is kept
MAX_PLAN = 512               # longest closing plan looked for (each step is a mask)
# Single-byte steps the closing plan tries, first allowed wins. Inside a JSON string: its
# closing quote; elsewhere: close the innermost container, a separator (before any digit:
# a number may always take one more), an empty string, the shortest number, the openers.
IN_STRING_ORDER = b'"}],:01[{ntf-a \n'
CLOSING_ORDER = b'}],":01[{ntf-a \n'


def string_state(state: tuple[bool, bool], data: bytes) -> tuple[bool, bool]:
    """(inside a JSON string, after its backslash) once ``data`` follows ``state``."""
    inside, escaped = state
    for byte in data:
        if escaped:
            escaped = False
        elif inside and byte == 0x5C:
            escaped = True
        elif byte == 0x22:
            inside = not inside
    return inside, escaped


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for ``spec`` (raises GrammarError for a malformed one)."""
    import llguidance

    try:
        if spec.kind == "json_schema":
            schema = json.loads(spec.value)
            return llguidance.LLMatcher.grammar_from_json_schema(
                strict_schema(schema) if isinstance(schema, dict) else spec.value,
                defaults=JSON_DEFAULTS)
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


_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalItems", "not", "if", "then", "else", "contains",
                  "additionalProperties", "unevaluatedProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: Any, *, in_all_of: bool = False) -> Any:
    """``schema`` with ``additionalProperties: false`` on each object schema that says
    nothing about extra keys (a copy; see the module's docstring). Members of an
    ``allOf`` are left open: each would otherwise forbid the keys the others declare."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [strict_schema(sub) for sub in value]
        elif key == "allOf" and isinstance(value, list):
            out[key] = [strict_schema(sub, in_all_of=True) for sub in value]
        elif key in _SCHEMA_VALUES:
            out[key] = strict_schema(value)
        else:
            out[key] = value
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or (
        types is None and "properties" in out)
    if is_object and not in_all_of and not any(
            k in out for k in ("additionalProperties", "patternProperties",
                               "unevaluatedProperties", "$ref", "allOf")):
        out["additionalProperties"] = False
    return out


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
        self.eos_token = int(list(eos_token_ids)[0])
        singles = self._single_byte_tokens()
        self._byte_tokens = [singles[b] for b in CLOSING_ORDER if b in singles]
        self._string_tokens = [singles[b] for b in IN_STRING_ORDER if b in singles]
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

    def _single_byte_tokens(self) -> dict[int, int]:
        """Byte -> the ordinary token of just that byte, for the bytes the closing plan tries."""
        found: dict[int, int] = {}
        for token in range(self.tokenizer_info.vocab_size):
            if self.tokenizer_info.is_special_token(token):
                continue
            piece = self.tokenizer_info.decode_bytes([token])
            if len(piece) == 1 and piece[0] in CLOSING_ORDER and piece[0] not in found:
                found[piece[0]] = token
        return found

    def closing_plan(self, matcher: Any, limit: int,
                     state: tuple[bool, bool] = (False, False)) -> list[int] | None:
        """Tokens that take ``matcher`` (left as it is) to an accepting state, at most
        ``limit`` of them, or None when none was found within ``limit``; ``state``: the
        output so far ends inside a JSON string (:func:`string_state`).

        A walk on a copy: forced bytes as llguidance tokenizes them; otherwise the first
        allowed byte of :data:`IN_STRING_ORDER` or :data:`CLOSING_ORDER` (inside a string
        its closing quote; after a value the innermost closer; where a value must start,
        ``0`` or ``""``), else the first allowed token. The bytes walked are then tokenized and kept in
        that shorter form when the grammar takes it whole.
        """
        walk = matcher.deep_copy()
        plan: list[int] = []
        limit = min(limit, MAX_PLAN)
        steps = 4 * limit + 16  # the walk goes byte by byte; the plan is tokenized after
        while not walk.is_accepting():
            if len(plan) >= steps or walk.is_error():
                return None
            forced = walk.compute_ff_tokens()
            if forced:
                step = forced[: steps - len(plan)]
            else:
                mask = memoryview(walk.compute_bitmask()).cast("I")
                order = self._string_tokens if state[0] else self._byte_tokens
                step = [t for t in order if mask[t >> 5] >> (t & 31) & 1][:1]
                if not step:
                    word = next((w for w, bits in enumerate(mask) if bits), None)
                    if word is None:
                        return None
                    bits = mask[word]
                    step = [word * 32 + (bits & -bits).bit_length() - 1]
            if not walk.consume_tokens(step):
                return None
            state = string_state(state, self.tokenizer_info.decode_bytes(step))
            plan.extend(step)
        if len(plan) > 1:
            shorter = self.tokenizer_info.tokenize_bytes(self.tokenizer_info.decode_bytes(plan))
            if len(shorter) < len(plan):
                check = matcher.deep_copy()
                if check.consume_tokens(shorter) and check.is_accepting():
                    plan = list(shorter)
        return plan if len(plan) <= limit else None

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


class Closer:
    """One constrained sequence's closing rule (see the module's docstring).

    The scheduler calls :meth:`arm` before each step with the tokens the sequence may
    still generate, the sampler :meth:`choose` with the token it picked; the scheduler
    then consumes the chosen token into the matcher as usual.
    """

    def __init__(self, compiler: GrammarCompiler, matcher: Any):
        self.compiler, self.matcher = compiler, matcher
        self.window: int | None = None  # set on the first step from the first plan's length
        self.left: int | None = None    # tokens left this step, when inside the window
        self.plan: list[int] | None = None
        self.gave_up = False
        self.state = (False, False)     # string_state of the output so far

    def arm(self, left: int) -> None:
        if self.window is None:
            first = self.compiler.closing_plan(self.matcher, left, self.state)
            # A schema whose smallest document is long needs the plan kept for longer.
            self.window = CLOSE_WITHIN + 2 * (len(first) if first is not None else 0)
        self.left = left if left <= self.window and not self.gave_up else None
        if self.left is not None and self.plan is None:
            self.plan = self.compiler.closing_plan(self.matcher, left, self.state)
            if self.plan is None:  # the budget cannot hold any ending: let it be cut
                self.gave_up, self.left = True, None

    def choose(self, token: int) -> int:
        """``token`` if an ending still fits after it, else the plan's next token."""
        chosen = self._choose(token)
        self.state = string_state(self.state, self.compiler.tokenizer_info.decode_bytes([chosen]))
        return chosen

    def _choose(self, token: int) -> int:
        if self.left is None or self.plan is None:
            return token
        plan = self.plan
        if plan and token == plan[0]:
            self.plan = plan[1:]
            return token
        after = self.matcher.deep_copy()
        if after.consume_token(token) and not after.is_error():
            if after.is_stopped():
                self.plan = []
                return token
            state = string_state(self.state, self.compiler.tokenizer_info.decode_bytes([token]))
            following = self.compiler.closing_plan(after, self.left - 1, state)
            if following is not None:
                self.plan = following
                return token
        if not plan:  # accepting now, and nothing else would end in time: end here
            self.plan = []
            return self.compiler.eos_token
        self.plan = plan[1:]
        return plan[0]


_BITS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[i, t]`` to -inf where bit ``t`` of ``bitmask[i]`` is 0, in place.

    llguidance's own helper is ``torch.compile``d (a C++ toolchain and seconds of warm-up
    on the first request); unpacking the bits is one vectorised shift here.
    """
    vocab, bitmask = logits.shape[-1], bitmask.to(logits.device)  # llguidance's is on the CPU
    allowed = ((bitmask.unsqueeze(-1) >> _BITS.to(logits.device)) & 1).view(bitmask.shape[0], -1)
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
