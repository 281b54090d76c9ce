"""OpenAI's error shape for every failure the HTTP layer reports.

Every error response is ``{"error": {"message", "type", "param", "code"}}`` with the
status code below, whether it comes from the engine (``lorart.serve.errors``: the
engine's exceptions carry their own ``.status``/``.type``/``.param``/``.code``), from
request validation (pydantic), from malformed JSON, or from the server's own checks
(auth, runtime-update permission, adapter-directory confinement).

| status | type                      | when                                                   |
| ------ | ------------------------- | ------------------------------------------------------ |
| 400    | invalid_request_error     | malformed JSON, invalid field, prompt too long          |
| 401    | authentication_error      | missing or wrong ``Authorization: Bearer``              |
| 403    | permission_error          | runtime updates disabled; path outside ``--adapter-dir``|
| 404    | not_found_error           | unknown model/adapter, adapter path that does not exist |
| 422    | (engine's)                | corrupt or incompatible adapter                         |
| 429    | rate_limit_error          | engine queue full (with ``Retry-After``)                 |
| 503    | service_unavailable_error | engine stopped / shutting down                          |
"""

from __future__ import annotations

import json
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the server reports in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: Exception) -> APIError:
    """The ``APIError`` for one of ``lorart.serve.errors``' exceptions.

    The engine's exceptions know their HTTP status and OpenAI type (the engine stays
    free of HTTP, the numbers are just attributes); a queue-full error adds
    ``Retry-After`` (whole seconds, at least 1).
    """
    status = int(getattr(exc, "status", 500))
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if status == 429:
        seconds = 1 if retry_after is None else max(1, math.ceil(float(retry_after)))
        headers["Retry-After"] = str(seconds)
    code = getattr(exc, "code", None)
    return APIError(status, str(exc) or type(exc).__name__, type=getattr(exc, "type", None),
                    param=getattr(exc, "param", None),
                    code=None if code is None else str(code), headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """``(message, param)`` for the first problem pydantic found, named by field."""
    problems = exc.errors()
    if not problems:
        return "invalid request", None
    first = problems[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}".rstrip(": "), None
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return message, param


def install_error_handlers(app: FastAPI) -> None:
    """Make every error leave ``app`` in OpenAI's shape (validation errors become 400,
    as OpenAI and vLLM answer them)."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(_request: Request, exc: json.JSONDecodeError):
        return APIError(400, f"request body is not valid JSON: {exc}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail),
                        headers=dict(exc.headers or {})).response()
