"""Per-model admission queue: where requests wait while every eligible slot is busy.

Contract for the router:
- ``offer`` a request when it arrives; a full queue returns a ``Rejection``
  (HTTP 429 with Retry-After at the edge) instead of queueing it.
- Whenever a slot frees (a stream ends) or a request arrives, call
  ``pop_best(can_run)`` until it returns None: it hands out the most urgent
  queued request for which ``can_run`` says a slot is free right now (for
  example, a confidential request only when an on-prem slot is free).
- Call ``expire`` periodically: requests that waited past ``max_queue_wait_ms``
  come back and get 503 with Retry-After; nothing waits forever.

Order: higher ``priority`` first, and waiting earns priority (one level per
``priority_aging_ms``), so low-priority work is delayed, never starved. Because
aging is linear, the relative order of two queued requests never changes, so
a heap keyed once at entry is exact.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pydantic import Field

from serve_app.policy.registry import PolicyParams

Clock = Callable[[], float]  # seconds, monotonic


class AdmissionParams(PolicyParams):
    max_queue_len: int = Field(default=256, ge=0, description="Requests that may wait per model; past it, 429.")
    max_queue_wait_ms: float = Field(default=30_000, gt=0, description="Longest wait in the queue; past it, 503.")
    priority_aging_ms: float = Field(
        default=2_000, gt=0, description="Waiting this long raises a request's priority by one level."
    )


@dataclass(eq=False)
class QueuedRequest:
    """One waiting request. ``payload`` is whatever the router needs to dispatch it."""

    request_id: str
    priority: int = 0
    payload: Any = None
    enqueued_at: float = 0.0
    _sort_key: float = field(default=0.0, repr=False)
    _seq: int = field(default=0, repr=False)

    def waited_ms(self, now: float) -> float:
        return (now - self.enqueued_at) * 1000.0


@dataclass(frozen=True)
class Rejection:
    reason: str  # "queue_full" | "queue_timeout"
    retry_after_s: float
    status: int  # 429 or 503


class AdmissionQueue:
    def __init__(self, params: AdmissionParams | None = None, clock: Clock = time.monotonic):
        self.params = params or AdmissionParams()
        self._clock = clock
        self._heap: list[tuple[float, int, QueuedRequest]] = []
        self._seq = itertools.count()
        self._live: set[QueuedRequest] = set()

    def __len__(self) -> int:
        return len(self._live)

    def offer(self, request: QueuedRequest, arrived_at: float | None = None) -> Rejection | None:
        """Queue ``request``; ``arrived_at`` (default now) is when it first arrived, so a request
        queued again keeps its age, priority and deadline."""
        if len(self._live) >= self.params.max_queue_len:
            return Rejection("queue_full", self.retry_after_s(), 429)
        now = self._clock() if arrived_at is None else arrived_at
        request.enqueued_at = now
        # Effective priority at time t: priority + (t - enqueued_at) / aging. Ordering by
        # priority - enqueued_at / aging is the same at every t.
        request._sort_key = -(request.priority - now * 1000.0 / self.params.priority_aging_ms)
        request._seq = next(self._seq)
        heapq.heappush(self._heap, (request._sort_key, request._seq, request))
        self._live.add(request)
        return None

    def remove(self, request: QueuedRequest) -> bool:
        """Forget a request (its client went away). Lazy: the heap entry is skipped later."""
        if request in self._live:
            self._live.discard(request)
            return True
        return False

    def pop_best(self, can_run: Callable[[QueuedRequest], bool] = lambda r: True) -> QueuedRequest | None:
        """The most urgent queued request that ``can_run`` accepts now, removed from the queue."""
        skipped = []
        chosen = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            request = entry[2]
            if request not in self._live:
                continue
            if can_run(request):
                chosen = request
                self._live.discard(request)
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return chosen

    def pop_best_of(self, candidates: Iterable[QueuedRequest],
                    can_run: Callable[[QueuedRequest], bool]) -> QueuedRequest | None:
        """``pop_best`` among ``candidates`` (a few the caller keeps track of; those no longer
        queued are ignored), without a pass over the whole queue."""
        for request in sorted((r for r in candidates if r in self._live), key=lambda r: (r._sort_key, r._seq)):
            if can_run(request):
                self._live.discard(request)  # (its heap entry is skipped later, as after ``remove``)
                return request
        return None

    def ordered(self) -> list[QueuedRequest]:
        """The queued requests, most urgent first (a snapshot)."""
        return sorted(self._live, key=lambda r: (r._sort_key, r._seq))

    def expire(self) -> list[tuple[QueuedRequest, Rejection]]:
        """Remove and return requests that waited past ``max_queue_wait_ms``."""
        now = self._clock()
        limit = self.params.max_queue_wait_ms
        expired = [r for r in self._live if r.waited_ms(now) > limit]
        rejection = Rejection("queue_timeout", self.retry_after_s(), 503)
        for request in expired:
            self._live.discard(request)
        return [(r, rejection) for r in sorted(expired, key=lambda r: r.enqueued_at)]

    def oldest_wait_ms(self) -> float:
        now = self._clock()
        return max((r.waited_ms(now) for r in self._live), default=0.0)

    def retry_after_s(self) -> float:
        """A hint for clients: a fraction of the longest wait, at least one second."""
        return max(1.0, self.params.max_queue_wait_ms / 1000.0 / 4)
