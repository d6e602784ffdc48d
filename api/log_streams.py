"""What libraries print goes through the log sanitizer too.

Gradio prints its own tracebacks (``traceback.print_exc()`` in its queue and
routes) and messages (``print(...)``) straight to ``sys.stderr``/``sys.stdout``,
past :class:`api.middleware.SafeLogFilter`: an exception message holding
``"\\nCRITICAL forged"`` from a request started a line of its own, and one
traceback carried 1.5 MB of request. :func:`route_std_streams_to_logging`
replaces both streams in the serving process with :class:`LoggingStream`, which
makes each piece of text a log record of its own (logger ``thai.stderr`` /
``thai.stdout``), so every line the process writes has the log format's prefix,
control characters escaped, secrets in query strings masked and a length cap.

A piece is what one ``write`` call, or several up to a newline, gave: a
traceback printed by ``traceback.print_exc`` becomes one record per frame and one
for the exception line, whatever newlines the exception's message holds. The
root handler keeps writing to the original stream (it was created before).
"""

from __future__ import annotations

import io
import logging
import sys
import threading

from api.middleware import MAX_LOG_CHARS, safe_log_text


class LoggingStream(io.TextIOBase):
    """A text stream whose writes become log records of ``logger`` at ``level``.

    Text is gathered until a write ends with a newline (or passes twice the record cap),
    then logged as one record. A write made while a record is being emitted (logging's
    own error report) goes to ``fallback`` directly, escaped and cut, never in a loop.
    """

    def __init__(self, logger: logging.Logger, level: int, fallback):
        super().__init__()
        self.logger, self.level, self.fallback = logger, level, fallback
        self._pending: list[str] = []
        self._pending_chars = 0
        self._lock = threading.RLock()
        self._local = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fallback.fileno()  # faulthandler and subprocess callers want the real one

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        if getattr(self._local, "emitting", False):
            self._write_fallback(text)
            return len(text)
        with self._lock:
            self._pending.append(text)
            self._pending_chars += len(text)
            if text.endswith("\n") or self._pending_chars > 2 * MAX_LOG_CHARS:
                self._emit()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit()
        try:
            self.fallback.flush()
        except (OSError, ValueError):
            pass

    def _emit(self) -> None:
        text = "".join(self._pending)
        self._pending, self._pending_chars = [], 0
        if text.endswith("\n"):
            text = text[:-1]
        if not text.strip():
            return
        self._local.emitting = True
        try:
            self.logger.log(self.level, "%s", text)
        finally:
            self._local.emitting = False

    def _write_fallback(self, text: str) -> None:
        try:
            self.fallback.write(safe_log_text(text.rstrip("\n")) + "\n")
        except (OSError, ValueError):
            pass


def route_std_streams_to_logging() -> None:
    """Replace ``sys.stdout`` and ``sys.stderr`` by :class:`LoggingStream` (idempotent).

    Call after the root handler exists (``logging.basicConfig``): it keeps the real
    stderr. Records of ``thai.stderr`` are warnings, of ``thai.stdout`` information.
    """
    if not isinstance(sys.stderr, LoggingStream):
        sys.stderr = LoggingStream(logging.getLogger("thai.stderr"), logging.WARNING, sys.stderr)
    if not isinstance(sys.stdout, LoggingStream):
        sys.stdout = LoggingStream(logging.getLogger("thai.stdout"), logging.INFO, sys.stdout)


CHILD_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def sanitize_child_output(level: int = logging.WARNING) -> None:
    """In a spawned helper process (document readers, the UI's counter): log as the server
    does, what the libraries print included. Spawned processes inherit the server's stderr
    but not its logging, so a parser's warning about a hostile file (pypdf's, say) would
    otherwise reach the log raw: newlines, control characters and all."""
    from api.middleware import install_log_sanitizer

    logging.basicConfig(level=level, format=CHILD_LOG_FORMAT)
    install_log_sanitizer(logging.getLogger().handlers)
    route_std_streams_to_logging()
