"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``
with the matching HTTP status, for every way a request can fail."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("kernelplane")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error"}


class APIError(Exception):
    """A request failure to report to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_validation(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """A one-line message naming each bad field, and the first one as ``param``."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error") or errors[0].get("msg")
        return f"malformed JSON body: {detail}", None

    if not [p for p in errors[0].get("loc", ()) if p != "body"]:  # the body as a whole is wrong
        return "the request body must be a JSON object (Content-Type: application/json)", None

    def where(e: dict) -> str:
        return ".".join(str(p) for p in e.get("loc", ()) if p != "body")

    # A field with a union type reports one error per alternative; name each field once.
    seen, parts = set(), []
    for e in errors:
        field = where(e) or "body"
        head = field.split(".")[0]
        if head in seen:
            continue
        seen.add(head)
        got = f" (got {_short_repr(e['input'])})" if "input" in e and field != "body" else ""
        parts.append(f"{field}: {e.get('msg')}{got}")
    return "invalid request: " + "; ".join(parts[:5]), where(errors[0]) or None


def install_error_handlers(app: FastAPI, on_reject: Callable[[int], None]) -> None:
    """Map every failure to an OpenAI error body; ``on_reject(status)`` counts it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        on_reject(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc)
        on_reject(400)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        on_reject(500)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()
