"""Engine failures, free of HTTP: ``api.errors`` maps each class to a status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class ModelNotReadyError(EngineError):
    """The model is still loading, failed to load, or the server is draining."""


class ModelLoadError(EngineError):
    """The configured model could not be loaded (message says why and what to do)."""


class EngineOverloadedError(EngineError):
    """The wait queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ContextLengthExceededError(EngineError):
    """Prompt plus requested output do not fit the model's context window."""


class GrammarError(EngineError):
    """A structured-output spec (JSON schema, regex, grammar) the grammar library refuses:
    the message is the library's own reason."""


class GenerationTimeoutError(EngineError):
    """The request passed its deadline before it finished."""


class EngineOutOfMemoryError(EngineError):
    """The accelerator ran out of memory during this request; the engine recovered."""


class EngineDeadError(EngineError):
    """The engine's worker died; the process should be restarted."""


class NoHealthyUpstreamError(EngineError):
    """THAI_ENGINE=openai: no upstream server passes its health probe."""


class UpstreamError(EngineError):
    """An upstream server failed (unreachable, 5xx after the retry, or broken mid-stream)."""


class UpstreamStatusError(EngineError):
    """An upstream's own error answer, passed on with the status the client should get
    (its 400s, 404s, 429s and 503s, with their ``Retry-After``)."""

    def __init__(self, status: int, message: str, error_type: str | None = None,
                 code: str | int | None = None, *, param: str | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.status, self.error_type, self.code = status, error_type, code
        self.param, self.retry_after = param, retry_after


class AdapterError(EngineError):
    """An adapter that cannot be served (bad folder, config, shapes or base): a 400."""


class UnknownModelError(EngineError):
    """A model name this engine does not serve (or no longer): a 404 model_not_found."""

    def __init__(self, name: str, served: list[str]):
        super().__init__(f"The model `{name[:256]}` does not exist. This server serves "
                         f"{', '.join(f'`{n}`' for n in served)}.")
        self.name, self.param = name, "model"


class AdapterInUseError(EngineError):
    """Unloading an adapter that requests are still using: a 409, they are never broken."""
