"""What the UI's buttons do: in-process calls into the serving layer and engine.

The UI never calls the HTTP API of its own server: it builds the same request
schemas as the routes (so validation is identical), asks ``Serving`` for the
prompt, and iterates the engine's stream, yielding every chunk to Gradio as it
arrives. The engine batches these requests together with API traffic; leaving
the stream early (stop button, closed tab) cancels the generation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from api.engine import GenerationChunk, GenerationRequest
from api.protocol import ChatCompletionRequest, SummarizeRequest
from api.serving import Serving
from api.text import is_blank
from thai_ui.chat_history import build_messages
from thai_ui.messages import error_for, ui_error
from thai_ui.status import status_html, status_is_final
from thai_ui.text_stats import TextCounter, TextStats

# The longest text /v1/summarize accepts; the UI's counters stop there too.
MAX_TEXT_CHARS: int = next(m.max_length for m in SummarizeRequest.model_fields["text"].metadata
                           if getattr(m, "max_length", None))


class UIHandlers:
    """Bound methods used as Gradio event handlers."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.counter = TextCounter()

    def close(self) -> None:
        self.counter.close()

    @property
    def engine(self):
        return self.serving.engine

    # ------------------------------------------------------------- status
    def status(self) -> tuple[str, bool]:
        """Banner HTML and whether polling may stop."""
        return status_html(self.engine), status_is_final(self.engine)

    # -------------------------------------------------------------- stats
    def text_stats(self, text: str | None, max_tokens: float | None) -> TextStats:
        """Counts for the summarize box; texts longer than a request may be are not counted.

        Word segmentation costs about a second per 200,000 characters and grows
        faster than linearly beyond, and this runs on every edit of a public
        page: the bound keeps an anonymous caller's cost at what a real request
        could cost. Events of this handler run one at a time (app.py), and long
        texts are counted in another process (:class:`TextCounter`).
        """
        text = text if isinstance(text, str) else ""
        if len(text) > MAX_TEXT_CHARS:
            return TextStats(graphemes=0, words=0, tokens=None, token_limit=None,
                             too_long=len(text), max_chars=MAX_TEXT_CHARS)
        tokens = limit = None
        if self.engine.ready:
            requested = max_tokens if isinstance(max_tokens, (int, float)) and 0 < max_tokens < 1e9 \
                else self.serving.settings.max_new_tokens
            limit = self.engine.info.max_context - int(requested)
            try:
                tokens = 0 if is_blank(text) else len(
                    self.engine.encode_chat(self.serving.summary_messages(text)))
            except Exception:  # the model went away between the check and the call
                tokens = limit = None
        graphemes, words = self.counter.count(text)
        return TextStats(graphemes=graphemes, words=words, tokens=tokens, token_limit=limit)

    def stats_markdown(self, text: str | None, max_tokens: float | None) -> str:
        return self.text_stats(text, max_tokens).markdown()

    # ---------------------------------------------------------- summarize
    async def summarize(self, text: str | None, max_tokens: float,
                        temperature: float) -> AsyncIterator[tuple[str, str]]:
        """Stream (summary so far, usage line) pairs."""
        started = time.perf_counter()
        if text is None or is_blank(text):
            raise ui_error("empty_text")
        try:
            request = SummarizeRequest(text=text, max_tokens=int(max_tokens),
                                       temperature=float(temperature))
            generation = await self.serving.summary_request(request)
        except Exception as exc:
            raise error_for(exc) from None
        async with aclosing(self._stream(generation)) as chunks:
            async for summary, chunk in chunks:
                yield summary.strip(), _usage_line(chunk, time.perf_counter() - started)

    # --------------------------------------------------------------- chat
    async def chat(self, message: Any, history: list[Any] | None, system_prompt: str | None,
                   max_tokens: float, temperature: float) -> AsyncIterator[str]:
        """Stream the assistant's reply (the text so far, as ChatInterface expects)."""
        messages = build_messages(message, history, system_prompt)
        if is_blank(messages[-1]["content"]):
            raise ui_error("empty_message")
        try:
            request = ChatCompletionRequest(model=self.serving.model_name, messages=messages,
                                            max_tokens=int(max_tokens),
                                            temperature=float(temperature))
            generation = await self.serving.chat_request(request)
        except Exception as exc:
            raise error_for(exc) from None
        async with aclosing(self._stream(generation)) as chunks:
            async for reply, _ in chunks:
                yield reply.lstrip()

    async def _stream(self, generation: GenerationRequest) -> AsyncIterator[tuple[str, GenerationChunk]]:
        """(text so far, latest chunk) for every chunk that adds text or finishes."""
        try:
            stream = self.engine.generate(generation)  # admission errors raise here
        except Exception as exc:
            raise error_for(exc) from None
        parts: list[str] = []
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                if chunk.text or chunk.finished:
                    yield "".join(parts), chunk
        except Exception as exc:
            raise error_for(exc) from None
        finally:
            await stream.aclose()


def _usage_line(chunk: GenerationChunk, seconds: float) -> str:
    used = (f"โทเค็น / tokens: {chunk.prompt_tokens:,} + {chunk.completion_tokens:,} = "
            f"**{chunk.prompt_tokens + chunk.completion_tokens:,}**")
    took = f"เวลา / time: **{seconds:.1f}** วินาที / s"
    if not chunk.finished:
        return f"กำลังสรุป… / summarizing… · {used} · {took}"
    cut = " · ⚠ ถึงความยาวสูงสุด / hit the length limit" if chunk.finish_reason == "length" else ""
    return f"เสร็จ / done · {used} · {took}{cut}"
