"""The request headers the router acts on, checked before anything else runs.

A header the router would use but cannot trust is a 400 naming it, never silently ignored:
``x-request-id`` (it reaches logs, spans and the engine), the priority, the declared data class,
the session and tenant labels, and the benchmark routing mode (only where benchmark modes are on).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Mapping

from serve_app.errors import InvalidRequest
from serve_app.pipeline.context import RequestHeaders
from serve_app.policy.classify import HEADER_DATA_CLASS, DataClass

HEADER_REQUEST_ID = "x-request-id"
HEADER_PRIORITY = "x-spillway-priority"
HEADER_SESSION = "x-session-id"
HEADER_TENANT = "x-spillway-tenant"
HEADER_ROUTING_MODE = "x-spillway-routing"
PRIORITY_RANGE = (-10, 10)
ROUTING_MODES = ("pow2", "onprem-only")
MAX_SESSION_CHARS = 256
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TENANT = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def valid_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def read_headers(headers: Mapping[str, str], benchmark_modes: bool = False) -> RequestHeaders:
    request_id = headers.get(HEADER_REQUEST_ID)
    if request_id is None or request_id == "":
        request_id = uuid.uuid4().hex
    elif not valid_request_id(request_id):
        raise InvalidRequest(f"{HEADER_REQUEST_ID} must be 1 to 128 characters of letters, digits and . _ : -",
                             param=HEADER_REQUEST_ID)
    session = headers.get(HEADER_SESSION) or None
    if session is not None and (len(session) > MAX_SESSION_CHARS or not _PRINTABLE.fullmatch(session)):
        raise InvalidRequest(f"{HEADER_SESSION} must be at most {MAX_SESSION_CHARS} printable ASCII characters",
                             param=HEADER_SESSION)
    tenant = headers.get(HEADER_TENANT) or None
    if tenant is not None and not _TENANT.fullmatch(tenant):
        raise InvalidRequest(f"{HEADER_TENANT} must be 1 to 64 characters of letters, digits and . _ : -",
                             param=HEADER_TENANT)
    declared = headers.get(HEADER_DATA_CLASS)
    mode = headers.get(HEADER_ROUTING_MODE) if benchmark_modes else None
    if mode is not None and mode not in ROUTING_MODES:
        raise InvalidRequest(f"{HEADER_ROUTING_MODE} must be one of {', '.join(ROUTING_MODES)}",
                             param=HEADER_ROUTING_MODE)
    return RequestHeaders(
        request_id=request_id,
        priority=_priority(headers.get(HEADER_PRIORITY)),
        priority_declared=bool(headers.get(HEADER_PRIORITY)),
        declared_class=DataClass.parse(declared) if declared else None,
        session=session,
        tenant=tenant or _key_fingerprint(headers.get("authorization", "")),
        routing_mode=mode,
    )


def _key_fingerprint(authorization: str) -> str:
    """A label for traces until keys map to tenants: a fingerprint of the API key, never the key."""
    if authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return "key-" + hashlib.sha256(authorization[7:].strip().encode()).hexdigest()[:12]
    return "anonymous"


def _priority(value: str | None) -> int:
    if value is None or value == "":
        return 0
    low, high = PRIORITY_RANGE
    if len(value) > 4 or not re.fullmatch(r"-?\d+", value) or not low <= int(value) <= high:
        raise InvalidRequest(f"{HEADER_PRIORITY} must be an integer from {low} to {high}", param=HEADER_PRIORITY)
    return int(value)
