"""RFC 9457 problem details: every error the API returns is application/problem+json with a stable code.

`type` is a relative URI naming the code (`/problems/<code>`); clients match on `code`, which never
changes once published.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shears.server.disk import is_disk_full

log = logging.getLogger("shears.server")
MEDIA_TYPE = "application/problem+json"

# Status codes Starlette/FastAPI raise themselves, mapped to our codes.
_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "validation_error",
    429: "queue_full",
    500: "internal",
    503: "unavailable",
    507: "insufficient_storage",
}


class ProblemDoc(BaseModel):
    """The shape of every error response (documented in the OpenAPI schema)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str


class Problem(Exception):
    def __init__(
        self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extensions: Any
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extensions = extensions


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(jsonable_encoder(extensions))
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def quoted(value: str, limit: int = 80) -> str:
    """`value` for an error message: repr'd, and cut to `limit` characters (a 100 KB id is not echoed)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _instance(request: Request) -> str:
    path = request.url.path
    return path if len(path) <= 200 else path[:200] + "..."


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for error in exc.errors():
        out.append(
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status,
            exc.code,
            exc.detail,
            instance=_instance(request),
            headers=exc.headers,
            **exc.extensions,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(part for part in first["loc"] if part not in ("body",)) or "request"
        return problem_response(
            422, "validation_error", f"{where}: {first['msg']}", instance=_instance(request), errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES_BY_STATUS.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem_response(
            exc.status_code, code, detail, instance=_instance(request), headers=dict(exc.headers or {})
        )

    async def _disk_full(request: Request, exc: Exception) -> JSONResponse:
        if not is_disk_full(exc):
            raise exc  # not ours to answer: the handler of last resort below says 500
        return problem_response(
            507, "insufficient_storage", "the server's disk is full; retry later", instance=_instance(request)
        )

    # A full disk (a file write, or the job store on that disk) is the server's condition, not a bug.
    app.add_exception_handler(OSError, _disk_full)
    app.add_exception_handler(SQLAlchemyError, _disk_full)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this answer (the ASGI server logs its traceback and
        # drops the connection): say so, or a client would reuse a connection that is going away.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, quoted(request.url.path))
        return problem_response(
            500,
            "internal",
            "internal server error",
            instance=_instance(request),
            headers={"Connection": "close"},
        )
