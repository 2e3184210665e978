"""Spillway's exceptions, and their one translation into OpenAI-format errors.

Everything below the HTTP edge raises (or returns) these; the ingress maps
them to a status and an OpenAI error body exactly once. Nothing else builds
error responses, so a client never sees a stack trace.
"""

from __future__ import annotations

from http import HTTPStatus


class SpillwayError(Exception):
    """Base of every error Spillway reports to a client."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.status, code=self.code, param=self.param)


class ConfigError(SpillwayError):
    """The configuration is invalid (raised at load, never on the request path)."""

    type = "config_error"


class InvalidRequest(SpillwayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(SpillwayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(SpillwayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(SpillwayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(SpillwayError):
    """Something other than a model does not exist (a key, in the admin API)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(SpillwayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(SpillwayError):
    """The request's body did not arrive in time (a client that trickles it holds a router slot)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RateLimited(SpillwayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(SpillwayError):
    """A budget is spent (OpenAI's own type and code for it)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class GovernanceUnavailable(SpillwayError):
    """The ledger cannot be reached: keyed requests fail closed."""

    status = 503
    type = "service_unavailable"
    code = "governance_unavailable"


class EngineUnavailable(SpillwayError):
    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"


def error_body(message: str, type_: str, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    """The body OpenAI's API (and so the official SDK) uses for errors."""
    if code is None:
        try:
            code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        except ValueError:
            code = str(status)
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
