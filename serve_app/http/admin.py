"""The admin API: tenants, keys, usage and budgets, behind the admin key.

Every route needs ``Authorization: Bearer <admin key>`` (the value of the router's
``governance.admin_key_env`` variable, compared in constant time); with no admin key set, every
call is 401. Changes go to the ledger, which writes them to its store before answering; the
router that took the call re-reads its key table at once, the others on their next sync.
``spillway keys|tenants|usage`` are clients of these routes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from serve_app.errors import AuthenticationFailed, InvalidRequest, NotFound
from serve_app.governance.keys import NAME_PATTERN, KeySpec, TenantSpec, bearer, check_admin_key
from serve_app.governance.store import USAGE_COLUMNS
from serve_app.http.body import read_body
from serve_app.ops.rollout import RolloutSpec

PREFIX = "/v1/spillway/admin"
MAX_ADMIN_BODY_BYTES = 65_536
ADMIN_TIMEOUT_S = 30.0
MAX_AUDIT_TAIL = 1_000
CONSOLE_RECORDS = 20
# The console: one static page and its script and style (no data in them; the script reads the
# admin API with the admin key). Read once, served with headers that keep it to itself.
_CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_FILES = {name: ((_CONSOLE_DIR / file).read_bytes(), media) for name, file, media in (
    ("console", "console.html", "text/html; charset=utf-8"),
    ("console.js", "console.js", "text/javascript; charset=utf-8"),
    ("console.css", "console.css", "text/css; charset=utf-8"))}
CONSOLE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store",
}


def install_admin(api: FastAPI, gateway) -> None:
    def require_admin(request: Request) -> None:
        if not check_admin_key(bearer(request.headers.get("authorization", "")), gateway.admin_key):
            raise AuthenticationFailed("The admin API needs the admin key ('Authorization: Bearer <admin key>')."
                                       if gateway.admin_key else "The admin API is off: no admin key is set.")

    def ledger(request: Request):
        require_admin(request)
        if gateway.ledger is None:
            raise NotFound("governance is not configured on this router")
        return gateway.ledger.handle

    async def body_of(request: Request, model):
        raw = await read_body(request, MAX_ADMIN_BODY_BYTES, gateway.config.router.body_timeout_s)
        try:
            return model.model_validate(json.loads(raw or b"{}"))
        except (ValueError, ValidationError) as exc:
            errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
            first = errors[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None

    async def changed(answer):
        await gateway.ledger.refresh()  # this replica knows the change before it answers
        return answer

    @api.get(PREFIX + "/keys")
    async def list_keys(request: Request):
        return JSONResponse({"data": await ledger(request).list_keys.remote()})

    @api.post(PREFIX + "/keys")
    async def create_key(request: Request):
        handle = ledger(request)
        spec = await body_of(request, KeySpec)
        return JSONResponse(await changed(await handle.create_key.remote(spec.model_dump(mode="json"))),
                            status_code=201)

    @api.post(PREFIX + "/keys/{key_id}/rotate")
    async def rotate_key(key_id: str, request: Request):
        created = await ledger(request).rotate_key.remote(key_id[:64])
        if created is None:
            raise NotFound(f"no active key {key_id[:64]!r}", param="key_id")
        return JSONResponse(await changed(created), status_code=201)

    @api.delete(PREFIX + "/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request):
        record = await ledger(request).revoke_key.remote(key_id[:64])
        if record is None:
            raise NotFound(f"no key {key_id[:64]!r}", param="key_id")
        return JSONResponse(await changed(record))

    @api.get(PREFIX + "/tenants")
    async def list_tenants(request: Request):
        return JSONResponse({"data": await ledger(request).list_tenants.remote()})

    @api.put(PREFIX + "/tenants/{name}")
    async def set_tenant(name: str, request: Request):
        handle = ledger(request)
        if not re.fullmatch(NAME_PATTERN[1:-1], name):
            raise InvalidRequest("a tenant name is 1 to 64 letters, digits and . _ : -", param="name")
        spec = await body_of(request, TenantSpec)
        return JSONResponse(await changed(await handle.set_tenant.remote(name, spec.model_dump(mode="json"))))

    @api.get(PREFIX + "/usage")
    async def usage(request: Request):
        handle = ledger(request)
        params = request.query_params
        first, last = usage_days(params.get("period", "day"), params.get("date"))
        by = list(dict.fromkeys(c for c in params.get("by", "tenant").split(",") if c))  # (each column once)
        unknown = set(by) - set(USAGE_COLUMNS)
        if unknown:
            raise InvalidRequest(f"by: one or more of {', '.join(USAGE_COLUMNS)}", param="by")
        rows = await handle.usage.remote(first, last, by)
        return JSONResponse({"from": first, "to": last, "by": by, "data": rows})

    @api.get(PREFIX + "/budgets")
    async def budgets(request: Request):
        return JSONResponse({"data": await ledger(request).budgets.remote()})

    @api.get(PREFIX + "/ledger")
    async def ledger_state(request: Request):
        return JSONResponse(await ledger(request).state.remote())

    @api.get(PREFIX + "/audit")
    async def audit_tail(request: Request):
        """The latest audit records (newest last); ``?limit=`` 1 to 1,000, default 50."""
        raw = request.query_params.get("limit", "50")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_AUDIT_TAIL:
            raise InvalidRequest(f"limit: a whole number from 1 to {MAX_AUDIT_TAIL}", param="limit")
        return JSONResponse({"data": await ledger(request).audit_tail.remote(int(raw))})

    # ---- progressive rollouts (the operator deployment runs them) ---------------------------------

    def operator(request: Request):
        require_admin(request)
        if gateway.operator is None:
            raise NotFound("no operator deployment on this app")
        return gateway.operator

    async def rollout_call(request: Request, action: str, body: dict | None = None):
        answer = await operator(request).rollout.remote(action, body)
        if isinstance(answer, dict) and "error" in answer:
            error = answer["error"]
            kind = NotFound if error["kind"] == "NotFound" else InvalidRequest
            raise kind(error["message"], param=error.get("param"))
        return answer

    @api.get(PREFIX + "/rollouts")
    async def rollouts(request: Request):
        return JSONResponse({"data": await rollout_call(request, "status")})

    def applied(status: dict) -> dict:
        # This router applies the new weights before it answers; the others within a second.
        gateway.apply_split_weights({status["alias"]: status["weights"]})
        return status

    @api.post(PREFIX + "/rollouts")
    async def start_rollout(request: Request):
        operator(request)
        spec = await body_of(request, RolloutSpec)
        return JSONResponse(applied(await rollout_call(request, "start", spec.model_dump(mode="json"))),
                            status_code=201)

    @api.post(PREFIX + "/rollouts/{alias:path}/abort")
    async def abort_rollout(alias: str, request: Request):
        return JSONResponse(applied(await rollout_call(request, "abort", {"alias": alias[:128]})))

    @api.get(PREFIX + "/console/data")
    async def console_data(request: Request):
        """Everything the console shows, in one answer: engines, the spill gate and queue per model
        (this router replica's view), budgets, this month's cost per site, the latest records."""
        handle = ledger(request)
        first, last = usage_days("month", None)
        _, health = await gateway.health()
        budgets, usage, audit = await asyncio.gather(
            handle.budgets.remote(), handle.usage.remote(first, last, ["site"]),
            handle.audit_tail.remote(CONSOLE_RECORDS))
        scheduler = gateway.scheduler_report()
        return JSONResponse({"router_replica": gateway.replica_tag, "health": health,
                             "scheduler": {"models": scheduler["models"]}, "budgets": budgets,
                             "usage": {"from": first, "to": last, "by": ["site"], "data": usage}, "audit": audit})

    for name, (content, media) in CONSOLE_FILES.items():
        def serve(content=content, media=media):
            return Response(content, media_type=media, headers=CONSOLE_HEADERS)

        api.add_api_route(f"/v1/spillway/{name}", serve, methods=["GET"], include_in_schema=False)

    @api.post(PREFIX + "/audit/rotate")
    async def audit_rotate(request: Request):
        """Close the open segment now and archive it (before an inspection, a verification)."""
        return JSONResponse(await ledger(request).audit_rotate.remote())


def usage_days(period: str, date: str | None) -> tuple[str, str]:
    """First and last day (``YYYY-MM-DD``, UTC) of a day or a month; ``date`` defaults to now."""
    if period == "day":
        date = date or time.strftime("%Y-%m-%d", time.gmtime())
        if not _is_date(date, r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date):
            raise InvalidRequest("date: YYYY-MM-DD for a day", param="date")
        return date, date
    if period == "month":
        date = date or time.strftime("%Y-%m", time.gmtime())
        if not _is_date(date, r"[0-9]{4}-[0-9]{2}", f"{date}-01"):
            raise InvalidRequest("date: YYYY-MM for a month", param="date")
        return f"{date}-01", f"{date}-31"
    raise InvalidRequest("period: day or month", param="period")


def _is_date(text: str, pattern: str, day: str) -> bool:
    """ASCII digits in the pattern's shape, naming a real calendar day."""
    if not re.fullmatch(pattern, text):
        return False
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        return False
    return True
