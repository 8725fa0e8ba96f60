"""Errors in OpenAI's shape: {"error": {"message", "type", "code"}}, and the handlers that give every
failure that shape (unknown routes, validation, the appliance's own errors, the unexpected)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError, ExitCode

log = logging.getLogger("appliance.service")


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str = "invalid_request_error", headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_STATUS = {
    ExitCode.NOT_FOUND: 404,
    ExitCode.CONFIG: 500,
    ExitCode.MODEL: 400,
    ExitCode.INGEST: 422,
    ExitCode.BUNDLE: 422,
    ExitCode.BUSY: 409,
    ExitCode.FEEDBACK: 422,
    ExitCode.GENERATION: 503,
    ExitCode.ENGINE: 503,
    ExitCode.STORE: 500,
}


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": code, "code": code}}, status_code=status, headers=headers
    )


def install_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.code, exc.headers)

    @api.exception_handler(ApplianceError)
    async def _appliance_error(_, exc: ApplianceError):
        status = _STATUS.get(exc.exit_code, 400)
        return _error(status, str(exc), type(exc).__name__, {"Retry-After": "2"} if status == 503 else None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):  # unknown route, wrong method: the same shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), code, getattr(exc, "headers", None))

    @api.exception_handler(UnicodeEncodeError)
    async def _not_unicode(_, exc: UnicodeEncodeError):  # a lone surrogate ("\ud800") in any JSON string
        return _error(
            400,
            f"the request holds text that is not valid Unicode (a lone surrogate, character {exc.start})",
            "invalid_request_error",
        )

    @api.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.error("internal error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the service's log", "internal_error")

    @api.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            parts.append(f"{where}: {e['msg']}")
        return _error(
            422 if any("json" in e["type"] for e in exc.errors()) else 400,
            "; ".join(parts),
            "invalid_request_error",
        )
