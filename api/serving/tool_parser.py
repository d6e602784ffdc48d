"""Split Qwen2.5 model output into message content and OpenAI tool calls.

Qwen2.5-Instruct writes a tool call the way its chat template shows it (the "hermes"
format; vLLM serves Qwen2.5 with ``--tool-call-parser hermes``)::

    optional text<tool_call>
    {"name": "get_weather", "arguments": {"city": "กรุงเทพ"}}
    </tool_call>
    <tool_call>
    {"name": ..., "arguments": {...}}
    </tool_call>

``<tool_call>`` and ``</tool_call>`` are plain (non-special) added tokens, so they survive
``skip_special_tokens=True`` and this module works on decoded text only.

The rules follow vLLM's ``Hermes2ProToolParser.extract_tool_calls``:

* content is the text before the first ``<tool_call>`` (``None`` when it is empty or only
  whitespace); text outside the blocks after the first call is dropped, as vLLM does;
* the last block may lack ``</tool_call>`` (the model stopped at EOS right after the JSON);
* if the *first* block is not a JSON object with a string ``name`` (or names a function
  not in ``tool_names``, when given), the whole output is returned as plain content with
  no calls: a half-understood answer is worse than the raw text, which the client can
  still show. Beyond vLLM, a missing ``arguments`` is taken as ``{}`` and ``arguments``
  given as a JSON string of an object is accepted; any other ``arguments`` fails the block;
* a block that fails *after* complete calls (most often the last one, cut by
  ``max_tokens``) is dropped with everything after it: complete calls are always
  returned as calls, and tool-call markup never becomes content next to them;
* with ``forced`` (``tool_choice`` required or named, so the grammar wrote the blocks) a
  failing block is dropped even when it is the first: it can only be a call cut short.

The streaming parser gives the same content and calls for any split of the same text
(the chat serving reads finished replies with it too, so both agree by construction);
``dropped`` says a block was dropped, which makes a cut reply's ``finish_reason``
``length``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Union

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# Either a closed block, or an unterminated one running to the end of the text.
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    """One call: the function name and its arguments as JSON text (what OpenAI sends)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for the message's ``content``."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete tool call, sent as one streamed ``tool_calls`` entry.

    ``index`` counts calls in the response from 0 (OpenAI's ``tool_calls[].index``);
    ``id`` is ``call_`` + 24 hex digits.
    """

    index: int
    id: str
    name: str
    arguments: str


StreamEvent = Union[ContentDelta, ToolCallDelta]


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id (``call_`` + 24 hex digits, from uuid4)."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_block(block: str, tool_names: set[str] | None = None) -> ParsedToolCall | None:
    """The call inside one ``<tool_call>`` block, or None when it is not a usable call."""
    try:
        obj = json.loads(block)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if tool_names is not None and name not in tool_names:
        return None
    args = obj.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):  # some fine-tunes double-encode; accept an object inside
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))


def _content_or_none(text: str) -> str | None:
    return text if text.strip() else None


def parse_tool_calls(
    text: str, tool_names: set[str] | None = None, *, forced: bool = False
) -> tuple[str | None, list[ParsedToolCall]]:
    """``(content, calls)`` for a finished output; see the module docstring for the rules.

    With no usable call (no ``<tool_call>``, or any block failing), ``content`` is the
    whole text (``None`` if it is only whitespace) and ``calls`` is empty.
    """
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return _content_or_none(text), []
    calls: list[ParsedToolCall] = []
    for closed, unterminated in _BLOCK.findall(text):
        call = parse_block(closed or unterminated, tool_names)
        if call is None:
            if calls or forced:
                break
            return _content_or_none(text), []
        calls.append(call)
    return _content_or_none(text[:start]), calls


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StreamingToolCallParser:
    """Incremental :func:`parse_tool_calls` for streamed text.

    ``feed(delta)`` returns the events the new text settles; ``finish()`` flushes at the
    end of the stream. Content is released as soon as it cannot be the start of
    ``<tool_call>`` (only a possible prefix of the tag is held back), except that leading
    whitespace is held until something else arrives, since content that is only
    whitespace is ``None``. A block's text is buffered until ``</tool_call>`` (or
    ``finish()``), then emitted as one :class:`ToolCallDelta`; a block that fails to parse
    is emitted as content, raw, and so is everything after it (for a first block, exactly
    the non-streaming result; after earlier calls, see the module docstring). ``calls``
    lists every call emitted, so the caller can set ``finish_reason`` to ``"tool_calls"``.
    """

    _TEXT, _BLOCK, _PLAIN, _DROP = "text", "block", "plain", "drop"

    def __init__(self, tool_names: set[str] | None = None, *, forced: bool = False) -> None:
        self.tool_names = tool_names
        self.forced = forced
        self.dropped = False  # a failing (cut) block was dropped: see the module docstring
        self.calls: list[ParsedToolCall] = []
        self._mode = self._TEXT
        self._buf = ""  # text not yet settled: a possible tag prefix, or an open block
        self._scan = 0  # in a block, where </tool_call> may start (earlier text was searched)
        self._pending_ws = ""  # leading whitespace-only content, held back
        self._content_sent = False
        self._events: list[StreamEvent] = []

    def feed(self, delta: str) -> list[StreamEvent]:
        """Take the next piece of decoded text; return what it settles."""
        self._buf += delta
        while True:
            if self._mode == self._DROP:
                self._buf = ""
                break
            if self._mode == self._PLAIN:
                self._emit_content(self._buf)
                self._buf = ""
                break
            if self._mode == self._TEXT:
                at = self._buf.find(TOOL_CALL_START)
                if at >= 0:
                    self._text(self._buf[:at])
                    self._buf = self._buf[at + len(TOOL_CALL_START):]
                    self._mode, self._scan = self._BLOCK, 0
                    continue
                keep = _held_prefix_len(self._buf, TOOL_CALL_START)
                self._text(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            end = self._buf.find(TOOL_CALL_END, self._scan)  # in a block
            if end < 0:  # don't rescan a long block on every delta
                self._scan = max(0, len(self._buf) - len(TOOL_CALL_END) + 1)
                break
            block, self._buf = self._buf[:end], self._buf[end + len(TOOL_CALL_END):]
            self._close_block(block, TOOL_CALL_START + block + TOOL_CALL_END)
        return self._take()

    def finish(self) -> list[StreamEvent]:
        """End of stream: settle the held tag prefix or the unterminated last block."""
        rest, self._buf = self._buf, ""
        if self._mode == self._BLOCK:
            self._close_block(rest, TOOL_CALL_START + rest)
        elif self._mode == self._PLAIN:
            self._emit_content(rest)
        elif self._mode == self._TEXT:
            self._text(rest)
        return self._take()

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The choice's ``finish_reason``: ``tool_calls`` when calls were found, unless a
        call was cut by the limit (``length``: the client must not take the reply as whole)."""
        if engine_reason == "length" and self.dropped:
            return "length"
        return "tool_calls" if self.calls else engine_reason

    # -- internals ---------------------------------------------------------------------

    def _text(self, text: str) -> None:
        """Text outside blocks: content before the first call, dropped after it."""
        if not text or self.calls:
            return
        if not self._content_sent and not text.strip():
            self._pending_ws += text
            return
        self._emit_content(text)

    def _emit_content(self, text: str) -> None:
        text, self._pending_ws = self._pending_ws + text, ""
        if not text:
            return
        self._content_sent = True
        if self._events and isinstance(self._events[-1], ContentDelta):
            self._events[-1] = ContentDelta(self._events[-1].text + text)
        else:
            self._events.append(ContentDelta(text))

    def _close_block(self, block: str, raw: str) -> None:
        call = parse_block(block, self.tool_names)
        if call is None and (self.calls or self.forced):
            self._mode, self.dropped = self._DROP, True
            return
        if call is None:
            self._mode = self._PLAIN
            self._emit_content(raw)
            return
        self._events.append(ToolCallDelta(len(self.calls), new_tool_call_id(), call.name, call.arguments))
        self.calls.append(call)
        self._mode = self._TEXT

    def _take(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events
