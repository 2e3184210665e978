"""The audit stage: decides, once the data class is known, whether this request's text goes into
its audit record (the tenant opted in up to a data class; never above it). The record itself is
made by the outcome sink, for every request, whatever its outcome."""

from __future__ import annotations

from serve_app.pipeline.context import RequestContext
from serve_app.policy.classify import DataClass


class AuditStage:
    name = "audit"

    async def run(self, ctx: RequestContext) -> None:
        rules = ctx.principal.tenant_rules if ctx.principal is not None else None
        up_to = rules.audit_text_up_to if rules is not None else None
        if up_to is not None and ctx.classification is not None and ctx.classification.data_class <= DataClass[up_to]:
            ctx.audit_text = True
            if ctx.captured is None:
                ctx.captured = bytearray()
