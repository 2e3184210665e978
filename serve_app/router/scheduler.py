"""Per-model scheduler: admission with continuous batching, placement and spill-over.

One ``ModelScheduler`` per model per router replica. Its unit of placement is
an engine *group*: one (model, site) engine deployment, whose slots are its
replicas x ``max_num_seqs``. (Serve spreads a group's requests over its
replicas and never sends a replica more than ``max_ongoing_requests``.)

- ``acquire`` queues the request and returns a ``Slot`` the moment a group
  the request may use has a free slot; the queue is bounded in length (429)
  and in wait (503), both with Retry-After.
- ``release`` frees the slot when the response ends, and hands it to the
  next queued request at once (continuous batching: nothing waits in an
  engine that is full, nothing waits in the router while a slot is free).
- Placement is the policy pipeline (residency, health, free slot, spill
  filters; site preference, affinity, free-slot scorers). The spill gate
  opens when the predicted wait for a preferred-site slot exceeds the model's
  ``spill_after_ms`` and closes with hysteresis.
- A group that failed a dispatch is held out for ``unhealthy_cooldown_s``, so
  a retry goes elsewhere, and a dead site is noticed on the first failure
  rather than at the next health check.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

from serve_app.errors import EngineUnavailable, RateLimited
from serve_app.policy.admission import AdmissionParams, AdmissionQueue, QueuedRequest
from serve_app.policy.classify import DataClass
from serve_app.policy.pipeline import (
    PlacementPipeline,
    ReplicaView,
    RequestView,
    SpillGate,
    SpillParams,
    predicted_wait_ms,
)

SERVICE_TIME_EWMA_ALPHA = 0.2
INITIAL_SERVICE_MS = 1_000.0
UNHEALTHY_COOLDOWN_S = 5.0
REPUMP_SLACK_S = 0.05
SPILL_REASON_NONE = "none"
SPILL_REASON_WAIT = "onprem_wait_over_budget"
SPILL_REASON_FAILOVER = "failover"


@dataclass(frozen=True)
class EngineGroup:
    """Static facts about one (model, site) engine deployment."""

    group_id: str
    model: str
    site: str
    site_rank: int
    trusted_up_to: DataClass
    slots: int
    cost_per_1k_tokens: float = 0.0


@dataclass
class Slot:
    group: EngineGroup
    queue_ms: float
    spill_reason: str
    acquired_at: float
    released: bool = False


class QueueTimeout(EngineUnavailable):
    code = "queue_timeout"


class ModelScheduler:
    def __init__(
        self,
        model: str,
        groups: list[EngineGroup],
        pipeline: PlacementPipeline,
        admission: AdmissionParams,
        spill: SpillParams,
        clock: Callable[[], float] = time.monotonic,
        unhealthy_cooldown_s: float = UNHEALTHY_COOLDOWN_S,
    ):
        self.model = model
        self.groups = {g.group_id: g for g in groups}
        self.pipeline = pipeline
        self.queue = AdmissionQueue(admission, clock=clock)
        self.gate = SpillGate(spill, clock=clock)
        self._clock = clock
        self._cooldown_s = unhealthy_cooldown_s
        self.in_flight: Counter[str] = Counter()
        # Requests other router replicas have on each group, from the engines' own counts.
        self.others_in_flight: Counter[str] = Counter()
        self.kv_cache_usage: dict[str, float] = {}
        self._unhealthy_until: dict[str, float] = {}
        self.mean_service_ms = INITIAL_SERVICE_MS
        self.spilled = Counter()

    # ---- public ----------------------------------------------------------------------

    async def acquire(self, request: RequestView, priority: int = 0, exclude: frozenset[str] = frozenset()) -> Slot:
        """Wait for a slot this request may use. Raises ``RateLimited`` (queue full) or
        ``QueueTimeout`` (waited too long); the caller turns them into 429 / 503."""
        loop = asyncio.get_running_loop()
        ticket = QueuedRequest(request.request_id, priority, payload=(request, exclude, loop.create_future()))
        rejection = self.queue.offer(ticket)
        if rejection is not None:
            raise RateLimited(
                f"model '{self.model}' has {len(self.queue)} requests waiting (the limit); retry later",
                retry_after_s=rejection.retry_after_s,
            )
        self.pump()
        future: asyncio.Future = ticket.payload[2]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self.queue.params.max_queue_wait_ms / 1000)
        except asyncio.TimeoutError:
            if future.done():  # dispatched in the same instant
                return future.result()
            self.queue.remove(ticket)
            raise QueueTimeout(
                f"no {'on-prem ' if request.data_class >= DataClass.confidential else ''}capacity for model "
                f"'{self.model}' within {self.queue.params.max_queue_wait_ms / 1000:.0f}s; retry later",
                retry_after_s=self.queue.retry_after_s(),
            ) from None
        except asyncio.CancelledError:
            # The client went away while waiting: forget the ticket, or give back a slot it just got.
            if not self.queue.remove(ticket) and future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, slot: Slot, *, failed: bool = False) -> None:
        """The request left the engine (finished, cancelled, or failed before its first token)."""
        if slot.released:
            return
        slot.released = True
        self.in_flight[slot.group.group_id] -= 1
        now = self._clock()
        if failed:
            self._unhealthy_until[slot.group.group_id] = now + self._cooldown_s
            # Requests waiting for this group must be looked at again when its cooldown ends,
            # even if nothing else arrives or finishes meanwhile. asyncio may run a timer up to
            # its clock resolution early, when the group would still look unhealthy and nothing
            # would pump again: wake a little after the cooldown instead.
            try:
                asyncio.get_running_loop().call_later(self._cooldown_s + REPUMP_SLACK_S, self.pump)
            except RuntimeError:  # no loop (synchronous unit use): the next acquire/release pumps
                pass
        else:
            elapsed_ms = (now - slot.acquired_at) * 1000
            self.mean_service_ms += SERVICE_TIME_EWMA_ALPHA * (elapsed_ms - self.mean_service_ms)
        self.pump()

    def observe_engine_load(self, group_id: str, engine_in_flight: int, kv_cache_usage: float = 0.0) -> None:
        """Fold in the engines' own in-flight count for a group (polled by the router). What is
        not ours belongs to other router replicas; it counts against the free slots until the
        next observation. Between polls a router may admit into slots another router just
        took: those requests wait in Serve's queue for that engine (Serve never sends an engine
        more than max_num_seqs), so engines are never overfilled."""
        previous_others, previous_kv = self.others_in_flight[group_id], self.kv_cache_usage.get(group_id, 0.0)
        self.others_in_flight[group_id] = max(0, engine_in_flight - self.in_flight[group_id])
        self.kv_cache_usage[group_id] = kv_cache_usage
        if self.others_in_flight[group_id] < previous_others or kv_cache_usage < previous_kv:
            self.pump()

    def _has_alternative(self, ticket: QueuedRequest, views: list[ReplicaView]) -> bool:
        request, exclude, _ = ticket.payload
        return any(
            v.site_rank > 0 and v.healthy and request.data_class <= v.trusted_up_to and v.replica_id not in exclude
            for v in views
        )

    def has_candidate(self, request: RequestView, exclude: frozenset[str] = frozenset()) -> bool:
        """Whether any group not excluded may ever run this request (residency), busy or not."""
        return any(
            request.data_class <= g.trusted_up_to for g in self.groups.values() if g.group_id not in exclude
        )

    def views(self) -> list[ReplicaView]:
        now = self._clock()
        return [
            ReplicaView(
                replica_id=g.group_id,
                model=g.model,
                site=g.site,
                site_rank=g.site_rank,
                trusted_up_to=g.trusted_up_to,
                slots=g.slots,
                in_flight=self.in_flight[g.group_id] + self.others_in_flight[g.group_id],
                healthy=self._unhealthy_until.get(g.group_id, 0.0) <= now,
                kv_cache_usage=self.kv_cache_usage.get(g.group_id, 0.0),
                cost_per_1k_tokens=g.cost_per_1k_tokens,
            )
            for g in self.groups.values()
        ]

    def predicted_preferred_wait_ms(self) -> float:
        preferred = [v for v in self.views() if v.site_rank == 0 and v.healthy]
        return predicted_wait_ms(
            queued_ahead=len(self.queue),
            free_slots=sum(v.free_slots for v in preferred),
            total_slots=sum(v.slots for v in preferred),
            mean_service_ms=self.mean_service_ms,
        )

    # ---- dispatch --------------------------------------------------------------------

    def pump(self) -> None:
        """Hand free slots to queued requests, most urgent first, until none fits."""
        while len(self.queue):
            spill_open = self.gate.update(self.predicted_preferred_wait_ms())
            views = self.views()
            decisions: dict[int, tuple] = {}

            def can_run(ticket: QueuedRequest) -> bool:
                request, exclude, future = ticket.payload
                if future.done():
                    return True  # cancelled meanwhile: drop it from the queue
                candidates = [v for v in views if v.replica_id not in exclude]
                decision = self.pipeline.place(replace(request, allow_spill=spill_open or bool(exclude)), candidates)
                if decision.replica is None:
                    return False
                decisions[id(ticket)] = (decision, request, exclude)
                return True

            ticket = None
            if spill_open:
                # Under pressure, a freed preferred-site slot goes first to a request that may run
                # nowhere else (residency); requests that may spill have the other sites.
                ticket = self.queue.pop_best(lambda t: not self._has_alternative(t, views) and can_run(t))
            if ticket is None:
                ticket = self.queue.pop_best(can_run)
            if ticket is None:
                return
            future = ticket.payload[2]
            if future.done():
                continue
            decision, request, exclude = decisions[id(ticket)]
            group = self.groups[decision.replica.replica_id]
            self.in_flight[group.group_id] += 1
            now = self._clock()
            if decision.reason == "spill":
                reason = SPILL_REASON_FAILOVER if exclude else SPILL_REASON_WAIT
                self.spilled[reason] += 1
            else:
                reason = SPILL_REASON_NONE
            future.set_result(Slot(group, ticket.waited_ms(now), reason, now))
