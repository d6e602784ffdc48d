"""Pick the next token for every sequence of a batch in one pass.

Temperature and top-p are applied as tensors over the whole batch (one sort,
one softmax), so sampling stays cheap as the batch grows; only the few
per-sequence rules (banned n-grams, EOS suppression before ``min_tokens``,
seeded generators) touch single rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class NGramBlocker:
    """Tokens that would repeat an n-gram already in this reply."""

    n: int
    seen: dict[tuple[int, ...], set[int]] = field(default_factory=lambda: defaultdict(set))
    history: list[int] = field(default_factory=list)

    def add(self, token: int) -> None:
        self.history.append(token)
        if self.n > 0 and len(self.history) >= self.n:
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


def sample_batch(logits: torch.Tensor, rows: list[RowRule]) -> list[int]:
    """``logits``: [batch, vocab] for the last position of each sequence."""
    logits = logits.float()
    for i, row in enumerate(rows):
        banned = row.blocker.banned()
        if banned:
            logits[i, banned] = float("-inf")
        if row.suppress:
            logits[i, row.suppress] = float("-inf")

    greedy = [i for i, row in enumerate(rows) if row.temperature <= 1e-5]
    sampled = [i for i, row in enumerate(rows) if row.temperature > 1e-5]
    out = [0] * len(rows)
    if greedy:
        picks = logits[greedy].argmax(dim=-1).tolist()
        for i, tok in zip(greedy, picks):
            out[i] = tok
    if not sampled:
        return out

    sub = logits[sampled]
    temps = torch.tensor([rows[i].temperature for i in sampled], dtype=sub.dtype, device=sub.device)
    sub = sub / temps[:, None]
    top_ps = torch.tensor([rows[i].top_p for i in sampled], dtype=sub.dtype, device=sub.device)
    if bool((top_ps < 1.0).any()):
        sorted_logits, sorted_idx = sub.sort(dim=-1, descending=True)
        probs_sorted = sorted_logits.softmax(dim=-1)
        cum = probs_sorted.cumsum(dim=-1)
        remove = (cum - probs_sorted) > top_ps[:, None]   # keeps at least the top token
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        sub = torch.full_like(sub, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = sub.softmax(dim=-1)

    unseeded = [j for j, i in enumerate(sampled) if rows[i].generator is None]
    if unseeded:
        picks = torch.multinomial(probs[unseeded], 1).squeeze(-1).tolist()
        for j, tok in zip(unseeded, picks):
            out[sampled[j]] = tok
    for j, i in enumerate(sampled):
        gen = rows[i].generator
        if gen is not None:
            out[i] = int(torch.multinomial(probs[j].cpu(), 1, generator=gen).item())
    return out
