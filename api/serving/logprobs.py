"""The engine's per-token log probabilities in OpenAI's two shapes: chat's
``logprobs.content`` (token, logprob, bytes, top_logprobs) and the legacy completions'
parallel lists (tokens, token_logprobs, top_logprobs, text_offset).

A token is named by its own bytes, decoded for ``token`` (a Thai character split over
two tokens shows U+FFFD in each ``token``, as OpenAI's do) and exact in ``bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from api.engine import Engine, TokenLogprob
from api.protocol import ChatCompletionTokenLogprob, ChoiceLogprobs, PromptLogprob, PromptLogprobs, TopLogprob
from api.protocol_text import CompletionLogprobs

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf, which JSON cannot carry


def _value(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isinf(logprob) or math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


class TokenNames:
    """Token ids to (text, bytes), asking the engine once per id."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._bytes: dict[int, bytes] = {}

    def load(self, ids: Sequence[int]) -> None:
        missing = sorted({i for i in ids if i not in self._bytes})
        if missing:
            self._bytes.update(zip(missing, self.engine.token_bytes(missing)))

    def text(self, token_id: int) -> str:
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def raw(self, token_id: int) -> list[int]:
        return list(self._bytes[token_id])


def _ids(entries: Sequence[TokenLogprob | None]) -> list[int]:
    ids = []
    for entry in entries:
        if entry is not None:
            ids.append(entry.token_id)
            ids.extend(token for token, _ in entry.top)
    return ids


def chat_logprobs(names: TokenNames, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    names.load(_ids(entries))
    return ChoiceLogprobs(content=[
        ChatCompletionTokenLogprob(
            token=names.text(e.token_id), logprob=_value(e.logprob), bytes=names.raw(e.token_id),
            top_logprobs=[TopLogprob(token=names.text(t), logprob=_value(lp), bytes=names.raw(t))
                          for t, lp in e.top])
        for e in entries])


def completion_logprobs(names: TokenNames, entries: Sequence[TokenLogprob], *, offset: int = 0,
                        prompt_ids: Sequence[int] = (),
                        prompt_entries: Sequence[TokenLogprob | None] = ()) -> CompletionLogprobs:
    """``entries`` after the prompt's (``echo``: ``prompt_entries``, aligned with
    ``prompt_ids``, the first None); ``offset``: characters of text before the first token."""
    names.load([*prompt_ids, *_ids(prompt_entries), *_ids(entries)])
    out = CompletionLogprobs()
    rows: list[tuple[int, TokenLogprob | None]] = list(zip(prompt_ids, prompt_entries))
    rows += [(e.token_id, e) for e in entries]
    for token_id, entry in rows:
        text = names.text(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_value(entry.logprob))
        top = {names.text(t): _value(lp) for t, lp in entry.top}
        top.setdefault(text, _value(entry.logprob))  # vLLM and OpenAI include the chosen one
        out.top_logprobs.append(top)
    return out


def prompt_logprobs(names: TokenNames, prompt_ids: Sequence[int],
                    entries: Sequence[TokenLogprob | None]) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt token (the first None), token id -> logprob,
    rank and text, the prompt's own token first, then the ``top`` alternatives (rank 1 is the
    most likely; the prompt's token has a rank when it is among them, else null)."""
    names.load([*prompt_ids, *_ids(entries)])
    out: PromptLogprobs = []
    for token_id, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranks = {t: rank for rank, (t, _) in enumerate(entry.top, 1)}
        row = {str(token_id): PromptLogprob(logprob=_value(entry.logprob), rank=ranks.get(token_id),
                                            decoded_token=names.text(token_id))}
        for t, lp in entry.top:
            row.setdefault(str(t), PromptLogprob(logprob=_value(lp), rank=ranks[t],
                                                 decoded_token=names.text(t)))
        out.append(row)
    return out
