"""The one translation of errors into OpenAI's error format, at the HTTP edge.

Everything below raises ``SpillwayError`` (``serve_app/errors.py``) or lets an unexpected error
through; a client only ever sees ``{"error": {"message", "type", "param", "code"}}`` with the
right status (and Retry-After where waiting helps), never a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serve_app.errors import SpillwayError, error_body

logger = logging.getLogger("spillway.http")

HEADER_SITE = "x-spillway-site"
STATUS_CLIENT_CLOSED = 499


def install(api: FastAPI, router_site: str) -> None:
    site = {HEADER_SITE: router_site}  # answers the router gives itself were served at its site

    async def translate(request: Request, exc: Exception) -> Response:
        return error_response(request, exc, site)

    for kind in (SpillwayError, StarletteHTTPException, RequestValidationError, ClientDisconnect, Exception):
        api.add_exception_handler(kind, translate)


def error_response(request: Request, exc: Exception, site: dict[str, str]) -> Response:
    """The client's answer for ``exc``: OpenAI's error format, or nothing for a client that left."""
    if isinstance(exc, SpillwayError):
        headers = {**site, **exc.headers}
        if exc.retry_after_s is not None:
            headers["retry-after"] = str(max(1, int(round(exc.retry_after_s))))
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    if isinstance(exc, StarletteHTTPException):
        message = {404: "route not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", exc.status_code),
                            status_code=exc.status_code, headers=site)
    if isinstance(exc, RequestValidationError):
        return JSONResponse(error_body("invalid request", "invalid_request_error", 400), status_code=400, headers=site)
    if isinstance(exc, ClientDisconnect):
        return Response(status_code=STATUS_CLIENT_CLOSED)  # nobody is listening; nothing to log
    logger.exception("unexpected error on %s", request.url.path, exc_info=exc)
    body = error_body("internal error in the Spillway router; see its logs", "internal_error", 500)
    return JSONResponse(body, status_code=500, headers=site)
