"""Per-model scheduler: admission with continuous batching, placement and spill-over.

One ``ModelScheduler`` per model per router replica. Its unit of placement is an engine *group*,
one (model, site) deployment; its capacity is the sequences its healthy replicas run at once.

- ``acquire`` queues a request and returns a ``Lease`` on ``n x prompts`` sequences the moment a
  group the request may use has room for them; the queue is bounded in length (429) and in wait
  (503), both with Retry-After.
- When a lease is released, the next queued request goes at once (continuous batching: nothing
  waits in an engine that is full, nothing waits in the router while room is free).
- The preferred (on-prem) site comes first. A request that residency lets run elsewhere spills
  when its predicted start on the preferred site would miss its TTFT budget
  (``policy/spill.py``), and at the latest when the budget runs out (the scan that decides it,
  and its rate limits: ``spill_scan.py``).
- A request that may run nowhere else (residency) gets freed preferred sequences before older
  ones that may go elsewhere, while a group elsewhere is up: those can also take the other
  site's sequences as they free, it cannot (the most constrained first).
- A full queue refuses (429) only what may not leave the preferred site or finds no room
  elsewhere either: a request that may spill goes elsewhere at once instead.
- A request none of whose groups has a healthy replica gets a 503 at once (Retry-After), rather
  than a wait for an engine Serve is still replacing.

Counted for the routing benchmark and the ``spillway_budget_miss_total`` metric: spillable
requests, and those that waited past ``spill_after_ms`` although a group elsewhere had room for
them (budget misses).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

from serve_app.errors import EngineUnavailable, ModelNotAllowed, RateLimited
from serve_app.policy.admission import AdmissionParams, AdmissionQueue, QueuedRequest
from serve_app.policy.placement import Decision, GroupView, PlacementPipeline, RequestView
from serve_app.policy.spill import BacklogPredictor, SpillGate, SpillParams, SpillPredictor
from serve_app.router.groups import EngineGroup, Speed
from serve_app.router.lease import Lease
from serve_app.router.lengths import AnswerLengths
from serve_app.router.outlook import SchedulerOutlook
from serve_app.router.spill_scan import SCAN_BURST_S, SpillScan

SPILL_REASON_NONE = "none"
SPILL_REASON_WAIT = "onprem_wait_over_budget"
SPILL_REASON_FAILOVER = "failover"
SPILL_REASON_QUEUE_FULL = "onprem_queue_full"
RETRY_PRIORITY_BOOST = 1_000
NO_HEALTHY_RETRY_AFTER_S = 5.0


@dataclass(eq=False)
class Ticket:
    request: RequestView
    future: asyncio.Future | None  # None: granted on arrival (``_grant_at_once``), never queued
    expected_tokens: int
    pinned: bool  # residency lets it run on the preferred site only
    retry: bool = False
    exclude: frozenset[str] = frozenset()
    late: bool = False  # waited past its budget while a group elsewhere had room for it


class NoHealthyEngine(EngineUnavailable):
    """Every group the request may use has no healthy replica: answered at once, not queued."""

    code = "engine_unavailable"


class NoAllowedSite(ModelNotAllowed):
    """No site of the model may take the request (its data class, its key's residency): 403 at
    once, never a wait in a queue that no engine can serve."""

    code = "residency_violation"


class QueueTimeout(EngineUnavailable):
    code = "queue_timeout"

    def __init__(self, message: str, *, retry_after_s: float, budget_miss: bool):
        super().__init__(message, retry_after_s=retry_after_s)
        self.budget_miss = budget_miss


class ModelScheduler(SchedulerOutlook, SpillScan):
    def __init__(self, model: str, groups: list[EngineGroup], pipeline: PlacementPipeline,
                 admission: AdmissionParams, spill: SpillParams, predictor: SpillPredictor | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.groups = {g.group_id: g for g in groups}
        self.pipeline = pipeline
        self.queue = AdmissionQueue(admission, clock=clock)
        self.spill = spill
        self.gate = SpillGate(spill, clock=clock)
        self.predictor = predictor or BacklogPredictor()
        self._clock = clock
        self.in_flight: Counter[str] = Counter()  # sequences this router has on each group
        self.others_in_flight: Counter[str] = Counter()  # other routers' sequences (engines' count)
        self.capacity = {g.group_id: g.capacity for g in groups}
        self.kv_cache_usage: dict[str, float] = {}
        self.speed = {g.group_id: Speed(spill.prior_itl_ms, spill.prior_ttft_ms) for g in groups}
        self.lengths = AnswerLengths(spill.assumed_output_tokens, spill.context_tokens)
        self._leases: dict[str, set[Lease]] = {g.group_id: set() for g in groups}
        self._retries = 0
        self._pinned: set[QueuedRequest] = set()  # queued requests that may run on the preferred site only
        self._room_since: float | None = None  # since when a group elsewhere has had room
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._scan_due = 0.0  # the spill scan's next turn (SCAN_GAP_S after the last)
        self._scan_tat = 0.0  # when the scans' allowance is whole again (SCAN_ITEM_ALLOWANCE_S per item)
        self.spilled: Counter[str] = Counter()
        self._cold_misses: Counter[str] = Counter()  # sequences that waited past budget for a cold group
        self.spillable = 0
        self.budget_misses = 0

    # ---- admission -------------------------------------------------------------------------

    async def acquire(self, request: RequestView, priority: int = 0, *, max_tokens: int | None = None,
                      retry: bool = False, exclude: frozenset[str] = frozenset(),
                      arrived_at: float | None = None) -> Lease:
        """Wait for room for this request. Raises ``RateLimited`` (queue full) or ``QueueTimeout``
        (waited too long); the edge turns them into 429 / 503. ``arrived_at``: a request queued
        again (its engine was full) keeps its place and its budget."""
        if retry:
            self._check_sites(request, exclude)
        else:
            lease = self.try_acquire(request, priority, max_tokens=max_tokens, exclude=exclude, arrived_at=arrived_at)
            if lease is not None:
                return lease
        loop = asyncio.get_running_loop()
        ticket = Ticket(request, loop.create_future(), self.expected_tokens(max_tokens),
                        pinned=not self._may_leave_preferred(request, exclude), retry=retry, exclude=exclude)
        queued = QueuedRequest(request.request_id, priority + (RETRY_PRIORITY_BOOST if retry else 0), ticket)
        rejection = self.queue.offer(queued, arrived_at)
        if rejection is not None:
            lease = None if ticket.pinned else self._spill_at_once(queued)
            if lease is not None:
                return lease
            raise RateLimited(f"model '{self.model}' has {len(self.queue)} requests waiting (the limit); retry later",
                              retry_after_s=rejection.retry_after_s)
        self._retries += retry
        if ticket.pinned:
            self._pinned.add(queued)
        try:
            self._scan_due = 0.0  # a newcomer is judged on arrival, allowance permitting (a spill then is at once)
            self.pump()
            if ticket.future.done():  # granted at once (the common case): no timer, nothing to await
                return ticket.future.result()
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can lose a cancellation that
            # arrives as the awaited future completes, and a client gone must cancel its request.
            # A request queued again (its engine was full) waits no longer in all than one queued once.
            waited_s = 0.0 if arrived_at is None else max(0.0, self._clock() - arrived_at)
            async with asyncio.timeout(max(0.0, self.queue.params.max_queue_wait_ms / 1000 - waited_s)):
                return await asyncio.shield(ticket.future)
        except asyncio.TimeoutError:
            if ticket.future.done():  # granted in the same instant
                return ticket.future.result()
            self.queue.remove(queued)
            raise QueueTimeout(
                f"no {'on-prem ' if ticket.pinned else ''}capacity for model '{self.model}' within "
                f"{self.queue.params.max_queue_wait_ms / 1000:.0f}s; retry later",
                retry_after_s=self.queue.retry_after_s(), budget_miss=ticket.late) from None
        except asyncio.CancelledError:
            # The client went away while waiting: forget the ticket, or give back what it just got.
            if not self.queue.remove(queued) and ticket.future.done() and not ticket.future.cancelled():
                ticket.future.result().release()
            raise
        finally:
            self._retries -= retry
            self._pinned.discard(queued)

    def try_acquire(self, request: RequestView, priority: int = 0, *, max_tokens: int | None = None,
                    exclude: frozenset[str] = frozenset(), arrived_at: float | None = None) -> Lease | None:
        """``acquire``'s synchronous part: raises as it does when no site may or can take the request,
        and grants it on the spot when nobody is queued and the preferred site has room. None: it
        must wait its turn (``acquire``, which starts with this)."""
        self._check_sites(request, exclude)
        if len(self.queue) or not self.queue.params.max_queue_len:
            return None  # (queued requests go first; a queue of length 0 refuses everything)
        return self._grant_at_once(request, priority, max_tokens, exclude, arrived_at)

    def _check_sites(self, request: RequestView, exclude: frozenset[str]) -> None:
        eligible = [g.group_id for g in self.groups.values()
                    if request.data_class <= g.trusted_up_to and g.group_id not in exclude]
        if not eligible:
            raise NoAllowedSite(
                f"the model '{self.model}' runs on no site allowed to process this request (data class "
                f"{request.data_class.name}{', on-prem only' if exclude else ''}); it was not sent anywhere",
                param="model")
        if not any(self.capacity[g] > 0 for g in eligible) and not any(self.groups[g].autoscaled for g in eligible):
            raise NoHealthyEngine(
                f"no healthy engine can take this request for model '{self.model}' now; retry later",
                retry_after_s=NO_HEALTHY_RETRY_AFTER_S)

    def _grant_at_once(self, request: RequestView, priority: int, max_tokens: int | None,
                       exclude: frozenset[str], arrived_at: float | None) -> Lease | None:
        """With nobody queued, a request the preferred site has room for is granted on the spot:
        what queueing it and pumping would decide (the queue's only member goes first), without a
        future, a heap entry or a wait. None: it must queue (no room, or it may only spill)."""
        views = self.views()
        if not any(v.free for v in views if v.site_rank == 0 and v.healthy):
            return None
        ticket = Ticket(request, None, self.expected_tokens(max_tokens),
                        pinned=not self._may_leave_preferred(request, exclude), exclude=exclude)
        decision = self._place(ticket, views, allow_spill=False)
        if decision is None:
            return None
        now = self._clock()
        queued = QueuedRequest(request.request_id, priority, ticket, enqueued_at=now if arrived_at is None else arrived_at)
        lease = self._grant(queued, decision, now)
        self._disarm()  # (what a pump finds with the queue empty)
        self._room_since = None
        return lease

    def release(self, lease: Lease, engine_full: bool = False) -> None:
        """Called by ``Lease.release`` only (exactly once per lease)."""
        group_id = lease.group.group_id
        self.in_flight[group_id] -= lease.sequences
        self._leases[group_id].discard(lease)
        if engine_full:  # what this router thought free, other routers hold: full until the next report
            self.others_in_flight[group_id] = max(self.others_in_flight[group_id],
                                                  self.capacity[group_id] - self.in_flight[group_id])
        self.pump()

    def expected_tokens(self, max_tokens: int | None) -> int:
        """Output tokens per sequence to expect from a request (``lengths.py``)."""
        return self.lengths.expected(max_tokens)

    def observe_usage(self, max_tokens: int | None, completion_tokens: int, sequences: int = 1) -> None:
        """Learn how long answers run from a finished request's usage (over all its ``sequences``)."""
        self.lengths.observe(max_tokens, completion_tokens, sequences)

    def observe_engine_load(self, group_id: str, sequences: int, kv_cache_usage: float = 0.0,
                            itl_ms: float | None = None, ttft_ms: float | None = None) -> None:
        """Fold in the engines' own count of sequences in flight (what is not ours belongs to other
        router replicas), their KV-cache use and their measured step times."""
        self.others_in_flight[group_id] = max(0, sequences - self.in_flight[group_id])
        self.kv_cache_usage[group_id] = kv_cache_usage
        speed = self.speed[group_id]
        if itl_ms:
            speed.itl_ms = itl_ms
        if ttft_ms:
            speed.ttft_ms = ttft_ms
        self.pump()

    def set_capacity(self, group_id: str, capacity: int) -> None:
        """Sequences the group's healthy replicas run at once (0: none is healthy)."""
        if self.capacity.get(group_id) != capacity:
            self.capacity[group_id] = capacity
            self.pump()

    def has_candidate(self, request: RequestView, exclude: frozenset[str] = frozenset()) -> bool:
        """Whether any group may ever run this request (residency), busy or not."""
        return any(request.data_class <= g.trusted_up_to for g in self.groups.values() if g.group_id not in exclude)

    def views(self) -> list[GroupView]:
        return [
            GroupView(
                group_id=g.group_id, model=g.model, site=g.site, site_rank=g.site_rank,
                trusted_up_to=g.trusted_up_to, capacity=self.capacity[g.group_id],
                in_flight=self.in_flight[g.group_id] + self.others_in_flight[g.group_id],
                healthy=self.capacity[g.group_id] > 0, kv_cache_usage=self.kv_cache_usage.get(g.group_id, 0.0),
                cost_per_1k_tokens=g.cost_per_1k_tokens,
            )
            for g in self.groups.values()
        ]

    def _may_leave_preferred(self, request: RequestView, exclude: frozenset[str]) -> bool:
        return any(g.site_rank > 0 and request.data_class <= g.trusted_up_to and g.group_id not in exclude
                   for g in self.groups.values())

    # ---- dispatch ----------------------------------------------------------------------------

    def pump(self, deadline: bool = False) -> None:
        """Grant queued requests the room there is: the preferred site first, then spill whatever
        would miss its budget there, then arm a timer for the next deadline. ``deadline``: the
        timer fired (a deadline, or a deferred scan): scan now, whatever the allowance."""
        now = self._clock()
        views = self._grant_preferred(now, self.views()) if len(self.queue) else None
        if views is None:  # no one waits (or everyone got room): nothing to spill, no deadline to watch
            self._disarm()
            self._room_since = None  # whatever room there is, nobody missed it
            return
        room = self._room_elsewhere(views)
        if room and self._room_since is None:
            self._room_since = now  # (every release and load change pumps: "now" is when it appeared)
        if len(self.queue) and room:
            due = max(self._scan_due, self._scan_tat - SCAN_BURST_S)
            if deadline or now >= due or not self._arm(due):
                room = self._spill_scan(now, views)
        else:
            self._disarm()
        if not room:
            self._room_since = None

    def _grant_preferred(self, now: float, views: list[GroupView]) -> list[GroupView] | None:
        """Grant the preferred site's room; the groups' views after it, or None once the queue is empty."""
        preferred_free = sum(v.free for v in views if v.site_rank == 0 and v.healthy)
        if not preferred_free and not self._retries:
            return views
        # Pinned requests first, while another site can take the rest (and some are queued to jump).
        pinned_first = any(v.site_rank > 0 and v.healthy for v in views)
        while len(self.queue):
            decisions: dict[int, Decision] = {}

            def fits(queued: QueuedRequest) -> bool:
                ticket: Ticket = queued.payload
                if ticket.future.done():
                    return True  # cancelled meanwhile: drop it
                decision = self._place(ticket, views, allow_spill=ticket.retry)
                if decision is None:
                    return False
                decisions[id(queued)] = decision
                return True

            queued = (self.queue.pop_best_of(self._pinned, fits)
                      if pinned_first and self._pinned and len(self._pinned) < len(self.queue) else None)
            if queued is None:
                queued = self.queue.pop_best(fits)
            if queued is None:
                break
            if not queued.payload.future.done():
                self._grant(queued, decisions[id(queued)], now)
                if not len(self.queue):
                    return None
                views = self.views()
                if not self._retries and not sum(v.free for v in views if v.site_rank == 0 and v.healthy):
                    break  # (the entry condition again: no request can be granted here; a deep queue is not scanned)
        return views

    def _place(self, ticket: Ticket, views: list[GroupView], allow_spill: bool) -> Decision | None:
        candidates = [v for v in views if v.group_id not in ticket.exclude] if ticket.exclude else views
        request = ticket.request
        if request.allow_spill != allow_spill:
            request = replace(request, allow_spill=allow_spill)
        decision = self.pipeline.place(request, candidates)
        return decision if decision.group is not None else None

    def _spill_at_once(self, queued: QueuedRequest) -> Lease | None:
        """The queue is full, and this request may leave the preferred site: rather than a 429, it
        goes elsewhere now if a group there has room (the newest of a full queue would wait the
        longest). None: no room elsewhere either."""
        ticket: Ticket = queued.payload
        now = self._clock()
        decision = self._place(ticket, self.views(), allow_spill=True)
        if decision is None or decision.group.site_rank == 0:
            return None
        queued.enqueued_at = now
        self._grant(queued, decision, now, SPILL_REASON_QUEUE_FULL)
        return ticket.future.result()

    def _grant(self, queued: QueuedRequest, decision: Decision, now: float, spill_reason: str | None = None) -> Lease:
        ticket: Ticket = queued.payload
        group = self.groups[decision.group.group_id]
        if group.site_rank == 0:
            reason = SPILL_REASON_NONE
        else:
            reason = SPILL_REASON_FAILOVER if ticket.retry else spill_reason or SPILL_REASON_WAIT
            self.spilled[reason] += 1
        if not ticket.pinned and not ticket.retry:
            self.spillable += 1
            self.budget_misses += ticket.late
            if group.site_rank == 0 and queued.waited_ms(now) > self.spill.spill_after_ms:
                # It waited past its budget on-prem; an autoscaled group with no room could have had it.
                cold = next((g for g in self.groups.values() if g.autoscaled and g.site_rank > 0
                             and self.capacity[g.group_id] == 0 and ticket.request.data_class <= g.trusted_up_to
                             and g.group_id not in ticket.exclude), None)
                if cold is not None:
                    self._cold_misses[cold.group_id] += ticket.request.sequences
        lease = Lease(self, group, ticket.request.sequences, queued.waited_ms(now), reason, now,
                      ticket.expected_tokens, budget_miss=ticket.late)
        self.in_flight[group.group_id] += lease.sequences
        self._leases[group.group_id].add(lease)
        if ticket.future is not None:  # (None: granted on arrival, never queued)
            ticket.future.set_result(lease)
        return lease
