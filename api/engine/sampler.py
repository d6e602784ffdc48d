"""Pick the next token for every sequence of a batch in one pass.

Everything that is a number per row (temperature, top-k, top-p, min-p, the penalties) is
applied as tensors over the whole batch (one partial selection, one softmax, one draw),
so sampling stays cheap as the batch grows. What is a set of tokens per row (penalties'
counts, ``logit_bias``, banned n-grams, EOS suppression before ``min_tokens``) is gathered
into one index per step; grammar masks come from llguidance for the constrained rows
together. A batch that uses none of it pays for none of it: the plain path is an argmax,
or one softmax and one draw.

Order, as vLLM's sampler: raw log probabilities (what ``logprobs`` reports) -> penalties ->
logit bias, bans, suppression -> grammar mask -> greedy, or temperature -> top-k -> top-p
-> min-p -> sample.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from api.engine.types import TokenLogprob


@dataclass
class NGramBlocker:
    """Tokens that would repeat an n-gram already in this reply."""

    n: int
    seen: dict[tuple[int, ...], set[int]] = field(default_factory=lambda: defaultdict(set))
    history: list[int] = field(default_factory=list)

    def add(self, token: int) -> None:
        if self.n <= 0:
            return
        self.history.append(token)
        if len(self.history) >= self.n:
            gram = self.history[-self.n:]
            self.seen[tuple(gram[:-1])].add(gram[-1])

    def banned(self) -> list[int]:
        if self.n <= 0 or len(self.history) < self.n - 1:
            return []
        key = tuple(self.history[-(self.n - 1):]) if self.n > 1 else ()
        found = self.seen.get(key)
        return list(found) if found else []


@dataclass
class RowRule:
    """Per-sequence sampling state the batch sampler needs."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    blocker: NGramBlocker
    suppress: list[int]          # token ids masked this step (EOS before min_tokens)
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    matcher: Any = None          # an llguidance matcher when the output is constrained
    closer: Any = None           # its api.engine.grammar.Closer: the output ends valid in time
    # Token -> times generated (frequency/presence penalties); the prompt's tokens
    # (repetition penalty, which covers prompt and output).
    counts: dict[int, int] = field(default_factory=dict)
    prompt_tokens: frozenset[int] = frozenset()

    @property
    def penalized(self) -> bool:
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def observe(self, token: int) -> None:
        """Record a generated token (the matcher is told by the scheduler, which must act
        on what it answers)."""
        self.blocker.add(token)
        if self.penalized:
            self.counts[token] = self.counts.get(token, 0) + 1


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[TokenLogprob | None]


def apply_penalties(logits: torch.Tensor, rows: list[RowRule]) -> None:
    """OpenAI's frequency/presence penalties and vLLM's repetition penalty, in place, for
    every penalized row at once: one gather and one scatter over (row, token) pairs."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    counts: list[float] = []
    rep_rows: list[int] = []
    rep_toks: list[int] = []
    for i, row in enumerate(rows):
        if not row.penalized:
            continue
        if row.frequency_penalty or row.presence_penalty:
            for token, count in row.counts.items():
                row_idx.append(i)
                tok_idx.append(token)
                counts.append(count)
        if row.repetition_penalty != 1.0:
            seen = row.prompt_tokens.union(row.counts)
            rep_rows.extend([i] * len(seen))
            rep_toks.extend(seen)
    vocab, on = logits.shape[-1], {"device": logits.device}
    floats = {"dtype": logits.dtype, **on}
    if rep_rows:
        r = torch.tensor(rep_rows, **on)
        t = torch.tensor(rep_toks, **on).clamp_(max=vocab - 1)
        penalty = torch.tensor([rows[i].repetition_penalty for i in rep_rows], **floats)
        values = logits[r, t]
        logits[r, t] = torch.where(values > 0, values / penalty, values * penalty)
    if row_idx:
        r = torch.tensor(row_idx, **on)
        t = torch.tensor(tok_idx, **on).clamp_(max=vocab - 1)
        c = torch.tensor(counts, **floats)
        freq = torch.tensor([rows[i].frequency_penalty for i in row_idx], **floats)
        pres = torch.tensor([rows[i].presence_penalty for i in row_idx], **floats)
        logits.index_put_((r, t), -(freq * c + pres), accumulate=True)


def _mask_tokens(logits: torch.Tensor, rows: list[RowRule]) -> None:
    """logit_bias, banned n-grams and suppressed tokens, as one index each."""
    bias_r: list[int] = []
    bias_t: list[int] = []
    bias_v: list[float] = []
    ban_r: list[int] = []
    ban_t: list[int] = []
    for i, row in enumerate(rows):
        for token, value in row.logit_bias:
            bias_r.append(i)
            bias_t.append(token)
            bias_v.append(value)
        for token in row.blocker.banned() + row.suppress:
            ban_r.append(i)
            ban_t.append(token)
    on = {"device": logits.device}
    if bias_r:
        logits.index_put_((torch.tensor(bias_r, **on), torch.tensor(bias_t, **on)),
                          torch.tensor(bias_v, dtype=logits.dtype, **on), accumulate=True)
    if ban_r:
        logits[torch.tensor(ban_r, **on), torch.tensor(ban_t, **on)] = float("-inf")


def sample_batch(logits: torch.Tensor, rows: list[RowRule], grammar: Any = None) -> SampleResult:
    """``logits``: [batch, vocab] for the last position of each sequence; ``grammar`` the
    :class:`~api.engine.grammar.GrammarCompiler` when some row has a matcher."""
    logits = logits.float()
    n = len(rows)
    lp_rows = [i for i, row in enumerate(rows) if row.logprobs is not None]
    raw = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None
    constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
    # Only n-gram bans and EOS suppression can leave a constrained row without any token
    # the grammar allows; only those rows keep a copy of their logits to fall back on.
    pristine = {i: logits[i].clone() for i in constrained
                if rows[i].blocker.n > 0 or rows[i].suppress}

    if any(row.penalized for row in rows):
        apply_penalties(logits, rows)
    _mask_tokens(logits, rows)
    if constrained:
        _apply_grammar(logits, constrained, pristine, rows, grammar)

    out = [0] * n
    greedy = [i for i, row in enumerate(rows) if row.temperature <= 1e-5]
    sampled = [i for i, row in enumerate(rows) if row.temperature > 1e-5]
    if greedy:  # (a whole batch of one kind is used as it is, not copied row by row)
        part = logits if len(greedy) == n else logits[greedy]
        for i, tok in zip(greedy, part.argmax(dim=-1).tolist()):
            out[i] = tok
    if sampled:
        _sample(logits if len(sampled) == n else logits[sampled], [rows[i] for i in sampled],
                sampled, out)
    for i in constrained:  # the closing rule (api.engine.grammar.Closer) may take over
        if rows[i].closer is not None:
            out[i] = rows[i].closer.choose(out[i])

    logprobs: list[TokenLogprob | None] = [None] * n
    if raw is not None:
        chosen = torch.tensor([out[i] for i in lp_rows], device=raw.device)
        picked = raw.gather(1, chosen[:, None]).squeeze(1).tolist()
        k = max(rows[i].logprobs or 0 for i in lp_rows)
        top_v, top_i = (raw.topk(k, dim=-1) if k else (None, None))
        for j, i in enumerate(lp_rows):
            want = rows[i].logprobs or 0
            top = (tuple(zip(top_i[j, :want].tolist(), top_v[j, :want].tolist()))
                   if want else ())
            logprobs[i] = TokenLogprob(out[i], picked[j], top)
    return SampleResult(out, logprobs)


def _apply_grammar(logits: torch.Tensor, constrained: list[int], pristine: dict[int, torch.Tensor],
                   rows: list[RowRule], grammar: Any) -> None:
    from api.engine.grammar import apply_bitmask

    bitmask = grammar.fill_masks([rows[i].matcher for i in constrained])
    sub = logits[constrained]
    apply_bitmask(sub, bitmask)
    # Bans and suppression never outvote the grammar: a row they left without any
    # allowed token gets the grammar's mask alone (the output must stay valid).
    # (A matcher that gave up masks every token: its request fails when the token is taken.)
    if pristine:
        dead = torch.isneginf(sub).all(dim=-1).tolist()
        for j, i in enumerate(constrained):
            if dead[j] and i in pristine:
                fallback = pristine[i][None]
                apply_bitmask(fallback, bitmask[j:j + 1])
                sub[j] = fallback[0]
    logits[constrained] = sub


# A top-k or a nucleus is cut from each row's best CANDIDATES tokens: one partial selection
# costs ~0.6 ms on a 151,936-token vocabulary where a full sort costs ~16 ms (per row, on
# one core). A row whose nucleus is wider than that (a flat distribution) is cut again from
# the whole vocabulary, sorted.
CANDIDATES = 512


def _sample(sub: torch.Tensor, rows: list[RowRule], where: list[int], out: list[int]) -> None:
    """Temperature, top-k, top-p, min-p, then one draw per row: a uniform number against the
    row's cumulative probabilities (torch.multinomial and an exponential race both draw one
    random number per vocabulary entry: ~5 ms a row on a 151,936-token vocabulary)."""
    vocab, device = sub.shape[-1], sub.device
    temperatures = torch.tensor([row.temperature for row in rows], dtype=sub.dtype, device=device)
    scaled = sub / temperatures[:, None]
    uniforms = _uniforms(rows).to(device)
    is_cut = [0 < row.top_k < vocab or row.top_p < 1.0 for row in rows]
    cut = [j for j in range(len(rows)) if is_cut[j]]
    full = [j for j in range(len(rows)) if not is_cut[j]]
    if cut:
        part = scaled if len(cut) == len(rows) else scaled[cut]
        chosen, covered = _cut_and_draw(part, [rows[j] for j in cut], uniforms[cut], CANDIDATES)
        for j, tok in zip(cut, chosen):
            out[where[j]] = tok
        wide = [j for c, j in enumerate(cut) if not covered[c]]
        if wide:  # drawn again from the whole vocabulary, sorted: it covers every nucleus
            again, _ = _cut_and_draw(scaled[wide], [rows[j] for j in wide], uniforms[wide], vocab)
            for j, tok in zip(wide, again):
                out[where[j]] = tok
    if full:
        part = scaled if len(full) == len(rows) else scaled[full]
        probs = _min_p(part.softmax(dim=-1), [rows[j] for j in full])
        for j, tok in zip(full, _draw(probs, uniforms[full]).tolist()):
            out[where[j]] = tok


def _cut_and_draw(scaled: torch.Tensor, rows: list[RowRule], uniforms: torch.Tensor,
                  width: int) -> tuple[list[int], list[bool]]:
    """Top-k, top-p and min-p over each row's best ``width`` tokens, then a draw: the tokens
    drawn, and for each row whether those tokens held its whole nucleus (always so with
    top-k, or when ``width`` is the vocabulary)."""
    vocab, device = scaled.shape[-1], scaled.device
    width = min(vocab, max([width] + [row.top_k for row in rows if 0 < row.top_k < vocab]))
    values, ids = scaled.topk(width, dim=-1)                # sorted, best first
    top_ks = [row.top_k if 0 < row.top_k < vocab else 0 for row in rows]
    has_k = torch.tensor([bool(k) for k in top_ks], device=device)
    if any(top_ks):
        ks = torch.tensor([k or width for k in top_ks], device=device)
        values.masked_fill_(torch.arange(width, device=device)[None, :] >= ks[:, None],
                            float("-inf"))
    # Probabilities over what top-k kept (the whole vocabulary if no top-k), best first.
    kept_norm = values.logsumexp(dim=-1)
    norm = (kept_norm if width == vocab or bool(has_k.all())
            else torch.where(has_k, kept_norm, scaled.logsumexp(dim=-1)))
    probs = (values - norm[:, None]).exp()
    cum = probs.cumsum(dim=-1)
    top_ps = torch.tensor([row.top_p for row in rows], dtype=probs.dtype, device=device)
    probs = probs.masked_fill((cum - probs) > top_ps[:, None], 0.0)  # keeps the best
    # Without top-k, the candidates hold the whole nucleus only if they already pass top_p
    # (the first token left out would then be cut too).
    covered = [True] * len(rows) if width == vocab else (has_k | (cum[:, -1] > top_ps)).tolist()
    picks = _draw(_min_p(probs, rows), uniforms)
    return ids.gather(1, picks[:, None]).squeeze(1).tolist(), covered


def _min_p(probs: torch.Tensor, rows: list[RowRule]) -> torch.Tensor:
    """Drops what is below min_p times the row's most likely token (a ratio, so it does not
    matter whether ``probs`` were renormalized after top-k/top-p)."""
    min_ps = [row.min_p for row in rows]
    if not any(min_ps):
        return probs
    best = probs.max(dim=-1, keepdim=True).values
    floor = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)[:, None] * best
    return probs.masked_fill(probs < floor, 0.0)


def _uniforms(rows: list[RowRule]) -> torch.Tensor:
    """One U[0, 1) per row: from the row's own generator when it has a seed, else the
    process's."""
    draws = torch.rand(len(rows), dtype=torch.float64)
    for j, row in enumerate(rows):
        if row.generator is not None:
            draws[j] = torch.rand(1, generator=row.generator, dtype=torch.float64)[0]
    return draws


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row, the first index whose cumulative weight exceeds ``uniform`` times the
    row's total: index i with probability weights[i] / total. The target stays below the
    total, so the index found always has a weight (a zero weight leaves the cumulative value
    unchanged and is never the first to exceed anything). On a CPU, torch accumulates a
    float32 cumsum in double: each value is within one float32 step of the exact sum."""
    cum = weights.cumsum(dim=-1)
    total = cum[:, -1:]
    target = torch.minimum(uniforms.to(cum.dtype)[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target, right=True).squeeze(1)
