"""Errors of the serving engine, each carrying what an HTTP layer needs.

``EngineError`` is a ``ValueError`` with ``.status`` (HTTP code), ``.type`` (OpenAI
error type string), ``.param`` (the request field at fault, or None) and ``.code``
(a short machine-readable code, or None). The engine raises them synchronously from
``Engine.submit`` (nothing is allocated then) or stores them in ``handle.error`` when
a request fails later (e.g. its adapter fails to load).
"""

from __future__ import annotations


class EngineError(ValueError):
    """Base class: ``status`` 500, type ``"server_error"``."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(EngineError):
    """Bad request fields (sampling parameters, prompt, adapter spec): HTTP 400."""

    status = 400
    type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus one generated token) does not fit the context or KV cache: 400."""

    def __init__(self, message: str, *, param: str | None = "prompt",
                 code: str | None = "context_length_exceeded") -> None:
        super().__init__(message, param=param, code=code)


class UnknownAdapterError(EngineError):
    """The adapter name is neither registered nor found in a registered directory: 404."""

    status = 404
    type = "not_found_error"

    def __init__(self, message: str, *, param: str | None = "adapter",
                 code: str | None = "adapter_not_found") -> None:
        super().__init__(message, param=param, code=code)


class AdapterLoadError(EngineError):
    """An adapter's files are missing, malformed or do not fit the model: 422."""

    status = 422
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = "adapter",
                 code: str | None = "adapter_load_failed") -> None:
        super().__init__(message, param=param, code=code)


class QueueFullError(EngineError):
    """Too many requests waiting: 429; retry after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0,
                 param: str | None = None, code: str | None = "queue_full") -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class EngineStoppedError(EngineError):
    """The engine is not running (not started, or shut down): 503."""

    status = 503
    type = "server_error"

    def __init__(self, message: str = "the engine is not running", *,
                 param: str | None = None, code: str | None = "engine_stopped") -> None:
        super().__init__(message, param=param, code=code)


__all__ = [
    "AdapterLoadError",
    "EngineError",
    "EngineStoppedError",
    "InvalidRequestError",
    "PromptTooLongError",
    "QueueFullError",
    "UnknownAdapterError",
]
