"""Stage: rate limits and budget, one call to the ledger for a keyed request.

The ledger checks that the key is still active, the requests and tokens per minute of the key
and its tenant, and their budgets; it reserves the estimate and answers from memory
(``serve_app/governance/ledger.py`` states the exactness bounds). The estimate: prompt tokens
from the body size (``governance.chars_per_token``) plus ``max_tokens`` (else what the context
leaves) per sequence; its cost is the most it can cost on any site the request may use. The
outcome sink settles the reservation with what the request really used, on every exit.
An open router (no keys) makes no call: its requests are only counted as usage.
"""

from __future__ import annotations

import math
import uuid

from serve_app.config import SiteKind, SpillwayConfig
from serve_app.errors import AuthenticationFailed, GovernanceUnavailable, QuotaExceeded, RateLimited
from serve_app.governance.budgets import to_micros
from serve_app.governance.client import LedgerClient, LedgerUnavailable
from serve_app.governance.cost import CostModel
from serve_app.governance.messages import AdmitRequest, Denial
from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.schema import ENDPOINT_EMBEDDINGS


class GovernStage:
    name = "govern"

    def __init__(self, config: SpillwayConfig, ledger: LedgerClient, costs: CostModel):
        self._ledger = ledger
        self._costs = costs
        self._chars_per_token = config.governance.chars_per_token
        self._context = {m.id: m.engine.max_model_len for m in config.models}
        self._sites = {m.id: [(s, config.site(s).kind == SiteKind.onprem) for s, n in m.replicas.items() if n > 0]
                       for m in config.models}

    async def run(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        shape = ctx.shape
        prompt = math.ceil(len(ctx.scan.rest) / self._chars_per_token)
        ctx.prompt_tokens_estimate = prompt
        if principal.key_id is None:
            return
        room = max(1, self._context[ctx.model] - prompt)  # (what the engine clamps max_tokens to)
        completion = 0 if ctx.endpoint == ENDPOINT_EMBEDDINGS else \
            (min(shape.max_tokens, room) if shape.max_tokens else room) * ctx.sequences
        on_any = [self._cost(ctx.model, site, prompt, completion) for site, onprem in self._sites[ctx.model]
                  if onprem or not ctx.onprem_only]
        on_prem = [self._cost(ctx.model, site, prompt, completion) for site, onprem in self._sites[ctx.model] if onprem]
        request = AdmitRequest(self._ledger.router_id, principal.key_id, principal.tenant, ctx.model,
                               prompt + completion, max(on_any, default=0), max(on_prem) if on_prem else None,
                               uuid.uuid4().hex)
        with ctx.trace.child("spillway.govern"):
            try:
                answer = await self._ledger.admit(request)
            except LedgerUnavailable as exc:
                raise GovernanceUnavailable(f"{exc}; try again shortly", retry_after_s=2) from None
        if isinstance(answer, Denial):
            raise _error(answer)
        ctx.admission = answer
        ctx.response_headers.update(answer.headers)
        if answer.onprem_only:
            ctx.onprem_only = True

    def _cost(self, model: str, site: str, prompt: int, completion: int) -> int:
        return to_micros(self._costs.request_cost(model, site, (prompt, completion)))


def _error(denial: Denial):
    if denial.status == 401:
        return AuthenticationFailed(denial.message)
    if denial.status == 503:  # the ledger could not decide (or the admission was given up): fail closed
        return GovernanceUnavailable(f"{denial.message} Try again shortly.", retry_after_s=denial.retry_after_s or 2)
    if denial.code == "insufficient_quota":
        return QuotaExceeded(denial.message, headers=denial.headers)
    return RateLimited(denial.message, retry_after_s=denial.retry_after_s, headers=denial.headers)
