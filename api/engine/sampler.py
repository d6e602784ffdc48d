"""Pick the next token for every sequence of a batch in one pass.

Everything that is a number per row (temperature, top-k, top-p, min-p, the penalties) is
applied as tensors over the whole batch (one sort, one softmax), so sampling stays cheap
as the batch grows. What is a set of tokens per row (penalties' counts, ``logit_bias``,
banned n-grams, EOS suppression before ``min_tokens``) is gathered into one index per
step; grammar masks come from llguidance for the constrained rows together. A batch that
uses none of it pays for none of it: the plain path is today's argmax or one multinomial.

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
    vocab = logits.shape[-1]
    if rep_rows:
        r = torch.tensor(rep_rows)
        t = torch.tensor(rep_toks).clamp_(max=vocab - 1)
        penalty = torch.tensor([rows[i].repetition_penalty for i in rep_rows], dtype=logits.dtype)
        values = logits[r, t]
        logits[r, t] = torch.where(values > 0, values / penalty, values * penalty)
    if row_idx:
        r = torch.tensor(row_idx)
        t = torch.tensor(tok_idx).clamp_(max=vocab - 1)
        c = torch.tensor(counts, dtype=logits.dtype)
        freq = torch.tensor([rows[i].frequency_penalty for i in row_idx], dtype=logits.dtype)
        pres = torch.tensor([rows[i].presence_penalty for i in row_idx], dtype=logits.dtype)
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
    if bias_r:
        logits.index_put_((torch.tensor(bias_r), torch.tensor(bias_t)),
                          torch.tensor(bias_v, dtype=logits.dtype), accumulate=True)
    if ban_r:
        logits[torch.tensor(ban_r), torch.tensor(ban_t)] = float("-inf")


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
    if greedy:
        for i, tok in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
            out[i] = tok
    if sampled:
        _sample(logits[sampled], [rows[i] for i in sampled], sampled, out)
    for i in constrained:  # the closing rule (api.engine.grammar.Closer) may take over
        if rows[i].closer is not None:
            out[i] = rows[i].closer.choose(out[i])

    logprobs: list[TokenLogprob | None] = [None] * n
    if raw is not None:
        chosen = torch.tensor([out[i] for i in lp_rows])
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


def _sample(sub: torch.Tensor, rows: list[RowRule], where: list[int], out: list[int]) -> None:
    """Temperature, top-k, top-p, min-p, then one multinomial per generator kind."""
    dtype, vocab = sub.dtype, sub.shape[-1]
    temps = torch.tensor([row.temperature for row in rows], dtype=dtype)
    sub = sub / temps[:, None]
    top_ks = [row.top_k if 0 < row.top_k < vocab else 0 for row in rows]
    top_ps = torch.tensor([row.top_p for row in rows], dtype=dtype)
    use_k, use_p = any(top_ks), bool((top_ps < 1.0).any())
    if use_k or use_p:
        sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
        if use_k:
            ks = torch.tensor([k or vocab for k in top_ks])
            sorted_logits.masked_fill_(torch.arange(vocab)[None, :] >= ks[:, None], float("-inf"))
        if use_p:
            probs_sorted = sorted_logits.softmax(dim=-1)
            cum = probs_sorted.cumsum(dim=-1)
            remove = (cum - probs_sorted) > top_ps[:, None]   # keeps at least the top token
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = sub.softmax(dim=-1)
    min_ps = [row.min_p for row in rows]
    if any(min_ps):
        floor = torch.tensor(min_ps, dtype=dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)

    unseeded = [j for j, row in enumerate(rows) if row.generator is None]
    if unseeded:
        picks = torch.multinomial(probs[unseeded], 1).squeeze(-1).tolist()
        for j, tok in zip(unseeded, picks):
            out[where[j]] = tok
    for j, row in enumerate(rows):
        if row.generator is not None:
            out[where[j]] = int(torch.multinomial(probs[j].cpu(), 1, generator=row.generator).item())
