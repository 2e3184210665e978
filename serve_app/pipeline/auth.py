"""Stages: who sent the request (API key -> tenant and key rules), and what the key may use.

``AuthStage`` runs first, on the request's head alone: a request without a valid key is refused
before its body is read or scanned. With no key ever created, the router is open (the
embedded demo; it says so at start-up and on ``/health``) and a request's tenant is its
``x-spillway-tenant`` label. Once keys exist, every request needs an active one: 401 otherwise.
A request that presents a well-formed Spillway key to a replica that knows no key re-reads the
table first (shared and rate-limited, as for any unknown key), so the first key's own requests are
never served open by a replica that has not heard of it yet; keyless requests may be, for at most
``governance.keys_refresh_s`` after the first key is made.
``AccessStage`` runs once the model is resolved: 403 for a model the key may not use, and the
residency rule of the key or its tenant (``onprem``: never leaves on-prem sites).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serve_app.errors import AuthenticationFailed, GovernanceUnavailable, ModelNotAllowed
from serve_app.governance.client import LedgerClient, LedgerUnavailable
from serve_app.governance.keys import KeySpec, TenantSpec, bearer, parse_key
from serve_app.pipeline.context import RequestContext
from serve_app.policy.classify import DataClass


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str | None = None  # None: the router is open (no keys exist)
    key: KeySpec | None = None
    tenant_rules: TenantSpec | None = None

    @property
    def default_class(self) -> DataClass | None:
        return DataClass[self.key.data_class] if self.key is not None and self.key.data_class else None

    @property
    def onprem_only(self) -> bool:
        return any(rules is not None and rules.residency == "onprem" for rules in (self.key, self.tenant_rules))


class AuthStage:
    name = "auth"

    def __init__(self, ledger: LedgerClient):
        self._ledger = ledger

    async def run(self, ctx: RequestContext) -> None:
        try:
            table = await self._ledger.ready()
        except LedgerUnavailable as exc:
            raise GovernanceUnavailable(f"{exc}; try again shortly", retry_after_s=2) from None
        presented = bearer(ctx.request.headers.get("authorization", ""))
        record = None
        looked_up = False
        if table.open and presented and parse_key(presented) is not None:
            # A Spillway key, and this replica knows none: the first key may have been made since
            # its last read (up to ``keys_refresh_s`` ago). Read again before serving it open.
            record, looked_up = await self._ledger.lookup(presented), True
            table = self._ledger.table
        if table.open:
            ctx.principal = Principal(ctx.headers.tenant, tenant_rules=table.tenants.get(ctx.headers.tenant))
            return
        if not presented:
            raise AuthenticationFailed("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        if record is None:
            record = table.check(presented) or (None if looked_up else await self._ledger.lookup(presented))
        if record is None:
            raise AuthenticationFailed("Incorrect API key provided (unknown or revoked).")
        headers = ctx.headers
        tier = record.spec.tier
        priority = min(headers.priority, tier) if headers.priority_declared else tier
        ctx.headers = dataclasses.replace(headers, tenant=record.tenant, priority=priority)
        ctx.principal = Principal(record.tenant, record.id, record.spec, self._ledger.table.tenants.get(record.tenant))
        ctx.trace.set(tenant=record.tenant, key_id=record.id)


class AccessStage:
    name = "access"

    def __init__(self, onprem_models: frozenset[str]):
        self._onprem_models = onprem_models  # models with a replica on an on-prem site

    async def run(self, ctx: RequestContext) -> None:
        principal: Principal = ctx.principal
        key = principal.key
        if key is not None and key.models is not None and not {ctx.requested_model, ctx.model} & set(key.models):
            raise ModelNotAllowed(f"This API key may not use the model '{ctx.requested_model[:256]}'.", param="model")
        if principal.onprem_only:
            if ctx.model not in self._onprem_models:
                raise ModelNotAllowed(f"This API key's traffic must stay on-prem, and the model '{ctx.model}' runs on "
                                      "no on-prem site.", param="model")
            ctx.onprem_only = True
