"""Turn generated token ids into text deltas, one token at a time.

Byte-level BPE splits a Thai character (3 UTF-8 bytes) across tokens, so a
token can end mid-character; decoding it alone gives U+FFFD. We keep a small
window of ids (the prefix/read offsets of TGI and vLLM) and only release text
once it decodes cleanly, holding back only an incomplete tail (a model that ends every
token mid-character still streams all the rest); when generation ends, :meth:`finish`
releases that tail as the tokenizer's own ``decode`` does (U+FFFD). Stop strings are matched on the text, and any tail
that could still become a stop string is held back so a client never sees
half of one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text without special tokens, the tokenizer's ``decode`` minus its Python wrapper.

    Every sequence decodes twice per token, so transformers' ``decode`` (argument
    conversion, then the Rust tokenizer, then an optional clean-up) cost about 11 µs a
    call on top of the Rust call's 3 µs: a third of a millisecond per step at 16 streams
    (profiled, ``bench/RESULTS.md``). A fast tokenizer whose output needs no clean-up is
    called directly; any other keeps ``decode``.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""           # all decoded text so far (stop string not yet cut)
    emitted: int = 0         # characters of ``text`` already released
    _prefix_offset: int = 0
    _read_offset: int = 0
    _taken: int = 0          # characters of the window's new text already added to ``text``

    # A window that has not decoded cleanly for this many tokens restarts from its last
    # few: a UTF-8 character is at most 4 bytes, so an incomplete tail lies in them.
    WINDOW = 8
    TAIL = 4

    def __post_init__(self) -> None:
        self._decode = text_decoder(self.tokenizer)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        decode = self._decode
        prefix = decode(self.ids[self._prefix_offset:self._read_offset])
        full = decode(self.ids[self._prefix_offset:])
        new = full[len(prefix):] if len(full) > len(prefix) else ""
        if new and not full.endswith("\ufffd"):
            self.text += new[self._taken:]
            self._taken = 0
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return
        # The text ends mid-character: release what comes before that tail (an earlier
        # U+FFFD, an invalid byte the tokenizer's decode shows too, is kept as it is).
        clean = new.rstrip("\ufffd")
        if len(clean) > self._taken:
            self.text += clean[self._taken:]
            self._taken = len(clean)
        if len(self.ids) - self._prefix_offset > self.WINDOW:
            self._restart(prefix, full)

    def _restart(self, prefix: str, full: str) -> None:
        """Start the window again near its end, at a token where the text splits cleanly
        (the part before decodes to the same characters alone), releasing what lies
        before that point: bytes that far back can no longer complete a character."""
        decode, first = self._decode, self._prefix_offset
        for start in range(len(self.ids) - self.TAIL, max(self._read_offset, first + 1) - 1, -1):
            head = decode(self.ids[first:start])
            if head.startswith(prefix) and head + decode(self.ids[start:]) == full:
                before = head[len(prefix):]
                if len(before) > self._taken:
                    self.text += before[self._taken:]
                self._taken = max(0, self._taken - len(before))
                self._prefix_offset = self._read_offset = start
                return

    def finish(self) -> None:
        """Generation ended: add the held-back tail as ``decode`` shows it (U+FFFD for
        bytes that never completed a character)."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.ids[self._prefix_offset:])
        new = full[len(prefix):] if len(full) > len(prefix) else ""
        if len(new) > self._taken:
            self.text += new[self._taken:]
        self._taken = len(new)

    def find_stop(self, include: bool = False) -> int:
        """Where the text ends because of a stop string: the index where the first one
        found starts, or where it ends with ``include`` (vLLM's
        ``include_stop_str_in_output``); -1 when there is none."""
        if not self.stop:
            return -1
        longest = max(len(s) for s in self.stop)
        start = max(0, self.emitted - longest)
        hits = [(i, i + len(s)) for s, i in ((s, self.text.find(s, start)) for s in self.stop)
                if i >= 0]
        if not hits:
            return -1
        begin, end = min(hits)
        return end if include else begin

    def take(self, final: bool = False, cut_at: int = -1) -> str:
        """Release text that can no longer be part of a stop string."""
        end = len(self.text) if cut_at < 0 else cut_at
        if not final and cut_at < 0 and self.stop:
            end -= self._held_back()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        tail = self.text[self.emitted:]
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:k]):
                    best = k
                    break
        return best
