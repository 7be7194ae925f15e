"""One error shape for every route: ``{"error", "reason", "detail"}`` (``query.models.ErrorOut``).

``error`` names the status (``not_found``, ``unprocessable``...), ``reason`` is a stable code a client
can branch on (``corrupt``, ``unknown_item``, ``too_many_pixels``...), ``detail`` says it for a
person. ``api_error`` raises one; ``install`` makes FastAPI answer its own errors (validation, 404
routes, ``HTTPException`` from dependencies such as ``query.access``) in the same shape.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_NAMES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "unprocessable", 429: "rate_limited", 499: "client_closed", 500: "internal", 502: "bad_gateway",
    503: "unavailable", 504: "gateway_timeout",
}


def error_name(status: int) -> str:
    if status in ERROR_NAMES:
        return ERROR_NAMES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def api_error(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    """An ``HTTPException`` that ``install``'s handler answers as ``{error, reason, detail}``."""
    return HTTPException(status, {"reason": reason, "detail": detail}, headers=headers)


def body(status: int, detail: Any) -> dict[str, Any]:
    if isinstance(detail, dict) and "reason" in detail:
        return {"error": error_name(status), "reason": str(detail["reason"]), "detail": detail.get("detail", "")}
    return {"error": error_name(status), "reason": error_name(status), "detail": detail if detail else ""}


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(body(exc.status_code, exc.detail), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"error": "unprocessable", "reason": "invalid_request", "detail": "; ".join(problems)},
                            status_code=422)


__all__ = ["api_error", "body", "error_name", "install"]
