"""The running batch's KV cache, and the shared-prefix cache that feeds it.

:class:`KVBatch` keeps one ``DynamicCache`` for all running sequences plus a
``[batch, length]`` attention mask (1 = real token) and each row's count of
real tokens (its next position id). Rows of different lengths line up through
padding columns that the mask hides; the pad may sit anywhere in a row (in
front after a join, between a shared prefix and the rest of a prompt), since
attention and positions only follow the mask.

:class:`PrefixCache` remembers the KV of one prompt prefix that recent prompts
shared (the system prompt and chat template, a fixed summarization
instruction). Prompts that start with it prefill only their remaining tokens,
the same idea as vLLM's automatic prefix caching, on a much smaller scale.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _pad_front(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class KVBatch:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None        # [batch, cache_len]
        self.positions: torch.Tensor | None = None   # [batch]

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows (a freshly prefilled cache and its mask) below the running ones."""
        positions = mask.sum(-1)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_front(old.keys, width - old_len, 2),
                                  _pad_front(new.keys, width - new_len, 2)], 0)
            old.values = torch.cat([_pad_front(old.values, width - old_len, 2),
                                    _pad_front(new.values, width - new_len, 2)], 0)
        self.mask = torch.cat([_pad_front(self.mask, width - old_len, 1),
                               _pad_front(mask, width - new_len, 1)], 0)
        self.positions = torch.cat([self.positions, positions], 0)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask including the new token, position ids) for one decode step."""
        mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)
        return mask, self.positions[:, None]

    def advance(self, mask: torch.Tensor) -> None:
        self.mask, self.positions = mask, self.positions + 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` and drop leading columns that are padding in every kept row."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        lead = int(self.mask.argmax(dim=1).min())  # first real column of the earliest row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        self.mask = self.mask[:, lead:]


class PrefixCache:
    """KV of one shared prompt prefix, learnt from the prompts that go by."""

    def __init__(self, min_tokens: int = 16, max_tokens: int = 4096):
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.tokens: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._last_prompt: list[int] = []
        self.hits = 0

    def match(self, prompt: list[int]) -> int:
        """Length of the cached prefix when ``prompt`` starts with it (and goes on), else 0."""
        n = len(self.tokens)
        if n and len(prompt) > n and prompt[:n] == self.tokens:
            return n
        return 0

    def past(self, rows: int) -> DynamicCache:
        """A cache holding the prefix for ``rows`` sequences."""
        return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1).contiguous(),
                                             v.expand(rows, -1, -1, -1).contiguous())
                                            for k, v in self.kv])

    def observe(self, prompt: list[int], cache: DynamicCache, row: int, start: int) -> None:
        """After a prefill: learn the prefix this prompt shares with the previous one.

        ``row`` and ``start`` locate the prompt's first token in ``cache``.
        """
        previous, self._last_prompt = self._last_prompt, prompt
        limit = min(len(prompt) - 1, len(previous), self.max_tokens)
        common = 0
        while common < limit and prompt[common] == previous[common]:
            common += 1
        if common < self.min_tokens or common <= len(self.tokens) and self.match(prompt):
            return
        self.tokens = prompt[:common]
        self.kv = [(layer.keys[row:row + 1, :, start:start + common].clone(),
                    layer.values[row:row + 1, :, start:start + common].clone())
                   for layer in cache.layers]

    def clear(self) -> None:
        self.tokens, self.kv, self._last_prompt = [], [], []
