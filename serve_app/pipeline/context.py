"""One request's state, from its headers to its outcome, and the owner of everything it holds.

Stages read and fill a ``RequestContext`` in turn (``pipeline/stages.py`` lists them). What a
request takes while it runs (its lease on engine sequences, its engine connection, anything a
later stage adds such as a budget reservation) is registered here, and ``close`` gives it all
back exactly once, then hands the finished context to the outcome sink. The HTTP edge calls
``close`` when the request's ASGI call ends, however it ends: answered, failed, cancelled, or the
client gone before or during the stream (``serve_app/http/owner.py``). Nothing is released by the
garbage collector.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from serve_app.pipeline.scan import ScanResult, compose_body
from serve_app.pipeline.schema import RequestShape
from serve_app.policy.classify import Classification
from serve_app.policy.splits import TrafficSplit
from serve_app.router.lease import Lease
from serve_app.transport.base import EngineReply

logger = logging.getLogger("spillway.request")

OUTCOME_OK = "ok"
OUTCOME_CANCELLED = "cancelled"
STATUS_CLIENT_CLOSED = 499


@dataclass(frozen=True)
class RequestHeaders:
    """The request headers the router acts on, validated (``serve_app/http/headers.py``)."""

    request_id: str
    priority: int = 0
    priority_declared: bool = False  # the client sent x-spillway-priority (a key's tier caps it)
    declared_class: Any = None  # DataClass | None: None when the client declared nothing
    session: str | None = None
    tenant: str = "anonymous"
    routing_mode: str | None = None  # benchmark baselines only


@dataclass
class StreamSummary:
    """What the relay saw of one stream, for metrics, spans, split counters and the predictor."""

    first_at: float | None = None
    last_at: float | None = None
    events: int = 0
    usage: tuple[int, int] | None = None
    failed: bool = False
    spliced: bool = False  # engine socket -> client socket (``splice.py``), not through ASGI

    def itl_ms(self) -> float | None:
        tokens = self.usage[1] if self.usage else self.events
        if self.first_at is None or self.last_at is None or tokens < 2:
            return None
        return (self.last_at - self.first_at) * 1000 / (tokens - 1)


@dataclass
class RequestContext:
    endpoint: str
    headers: RequestHeaders
    trace: Any  # RequestTrace
    request: Any = None  # the Starlette request (the parse stage reads its body)
    started_at: float = field(default_factory=time.monotonic)
    scan: ScanResult | None = None
    requested_model: str = ""
    model: str = ""
    split: TrafficSplit | None = None
    sequences: int = 1  # engine sequences it occupies (the resolve stage sets it)
    route: Any = None  # RouteChoice of a semantic alias (the semantic route stage)
    classification: Classification | None = None
    lease: Lease | None = None
    reply: EngineReply | None = None
    summary: StreamSummary = field(default_factory=StreamSummary)
    attempts: int = 0
    site: str | None = None  # where it ran, when no lease says so (the benchmark's pow2 baseline)
    budget_miss: bool = False  # waited past its budget with room elsewhere, and timed out
    principal: Any = None  # Principal: who sent it (the auth stage)
    onprem_only: bool = False  # residency rule of its key or tenant, or the on-prem-only budget policy
    admission: Any = None  # governance Admission: the ledger's reservation, settled by the outcome sink
    prompt_tokens_estimate: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)  # e.g. x-ratelimit-*
    captured: bytearray | None = None  # a streamed answer as the engine sent it (audit text, the cache)
    redaction: Any = None  # Redaction: placeholder -> PII value (never logged, traced or audited)
    restorer: Any = None  # StreamRestorer of a redacted streamed request
    audit_text: bool = False  # the audit record keeps the request's and answer's text
    cache_key: str | None = None  # a cacheable request that missed: its answer is stored
    cache_hit: bool = False
    status: int = 0
    outcome: str = ""
    closed: bool = False
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _sink: Callable[["RequestContext"], None] | None = None

    @property
    def request_id(self) -> str:
        return self.headers.request_id

    @property
    def shape(self) -> RequestShape:
        return self.scan.shape

    @property
    def stream(self) -> bool:
        return self.scan is not None and self.scan.shape is not None and self.shape.stream

    @property
    def strip_usage(self) -> bool:
        """The router always asks the engine for usage (token counts for metrics and cost) and
        drops the usage event again when the client did not ask for it."""
        options = self.shape.stream_options or {}
        return self.stream and not options.get("include_usage")

    def engine_body(self) -> bytes:
        options = {**(self.shape.stream_options or {}), "include_usage": True} if self.stream else \
            self.shape.stream_options
        return compose_body(self.scan.rest, self.model, options)

    def own(self, closer: Callable[[], None]) -> None:
        """Register something to give back when the request ends (run in reverse order)."""
        self._closers.append(closer)

    def engine_done(self) -> None:
        """The engine is done with the request: its sequences go to the next request now, before
        the answer has been written out. (``close`` would give them back in any case, once.)"""
        if self.lease is not None:
            self.lease.release()

    def finish(self, status: int, outcome: str) -> None:
        if not self.outcome:
            self.status, self.outcome = status, outcome

    def close(self) -> None:
        """Give back everything the request holds, then report it. Exactly once; never raises."""
        if self.closed:
            return
        self.closed = True
        self.finish(STATUS_CLIENT_CLOSED, OUTCOME_CANCELLED)
        steps: list[Callable[[], Any]] = []
        if self.reply is not None:
            steps.append(self.reply.close)  # a stream not read to its end aborts the request in the engine
        if self.lease is not None:
            steps.append(self.lease.release)
        steps += reversed(self._closers)
        if self._sink is not None:
            steps.append(lambda: self._sink(self))
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - one failing step must not keep the others from running
                logger.exception("request %s: closing step %r failed", self.request_id, step)
