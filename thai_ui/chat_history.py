"""Gradio 6 chat history -> plain ``{"role", "content": str}`` messages.

In Gradio 6 a history message's ``content`` may be a string, a list of parts
(``{"type": "text", "text": ...}``, files, components), a bare file dict or a
component. The chat template only takes text, so text parts are joined and
everything else is dropped; a message left with no text is skipped.
Thinking/tool messages (``metadata`` with a title) are the UI's own notes, not
turns of the conversation, and are skipped too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ROLES = ("system", "user", "assistant")


def content_text(content: Any) -> str:
    """The text in one message's content, whatever shape Gradio gave it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type") == "text" or ("text" in content and "file" not in content
                                             and "path" not in content):
            return str(content.get("text") or "")
        return ""  # file, image or component: nothing the model can read
    if isinstance(content, (list, tuple)):
        return "\n".join(text for text in (content_text(part) for part in content) if text)
    text = getattr(content, "text", None)  # a pydantic TextMessage
    return text if isinstance(text, str) else ""


def normalize_history(history: Iterable[Any] | None) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for message in history or ():
        if not isinstance(message, dict):
            message = getattr(message, "model_dump", lambda: {})()
        role = message.get("role")
        metadata = message.get("metadata") or {}
        if role not in ROLES or (isinstance(metadata, dict) and metadata.get("title")):
            continue
        text = content_text(message.get("content"))
        if text.strip():
            messages.append({"role": role, "content": text})
    return messages


def build_messages(message: Any, history: Iterable[Any] | None,
                   system_prompt: str | None) -> list[dict[str, str]]:
    """System prompt, then the normalised history, then the new user message."""
    messages = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    messages.extend(m for m in normalize_history(history) if m["role"] != "system")
    messages.append({"role": "user", "content": content_text(message)})
    return messages
