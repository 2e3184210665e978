"""Placement as a pipeline: Filter -> Score -> Pick, over a snapshot of replica views.

Contracts (as in llm-d's scheduler):
- a ``Filter`` keeps the replicas a request may run on (residency, health,
  free slot); an empty result means "not now", never "anywhere else";
- a ``Scorer`` returns a score in [0, 1] per replica (1 is best); the
  pipeline sums them with the configured weights;
- the ``Picker`` turns the weighted scores into one replica, or None.

``SpillGate`` decides per model whether requests may leave the preferred
(on-prem) site: it opens when the predicted on-prem wait exceeds the model's
``spill_after_ms`` and closes only when the wait falls below
``spill_after_ms * close_ratio`` and stays there for ``min_hold_ms``
(hysteresis, so traffic does not flap). Residency is a filter applied before
any of this: a confidential request never sees a cloud replica, spilling or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

from pydantic import Field

from serve_app.policy.classify import DataClass
from serve_app.policy.registry import Policy, PolicyParams, make


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one engine replica at decision time."""

    replica_id: str
    model: str
    site: str
    site_rank: int  # 0 = most preferred site (on-prem first)
    trusted_up_to: DataClass  # the most sensitive data class this site may process
    slots: int  # the engine's max concurrent sequences
    in_flight: int  # requests the router fleet has on it now
    healthy: bool = True
    kv_cache_usage: float = 0.0
    cost_per_1k_tokens: float = 0.0

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.in_flight)


@dataclass(frozen=True)
class RequestView:
    request_id: str
    model: str
    data_class: DataClass = DataClass.public
    affinity_key: str | None = None  # session / user: replicas that served it hold its KV prefix
    allow_spill: bool = False  # set by the SpillGate for this model at decision time


# ---- filters -------------------------------------------------------------------------


class Filter(Policy, kind="filter"):
    def filter(self, request: RequestView, replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
        return [r for r in replicas if self._keep(request, r)]

    def _keep(self, request: RequestView, replica: ReplicaView) -> bool:
        raise NotImplementedError


class ResidencyFilter(Filter, name="residency"):
    """A request runs only where its data class is trusted. Applied on every path."""

    def _keep(self, request: RequestView, replica: ReplicaView) -> bool:
        return request.data_class <= replica.trusted_up_to


class HealthFilter(Filter, name="health"):
    def _keep(self, request: RequestView, replica: ReplicaView) -> bool:
        return replica.healthy


class KvHeadroomParams(PolicyParams):
    max_kv_cache_usage: float = Field(default=0.95, gt=0, le=1, description="Skip replicas whose KV cache is fuller.")


class FreeSlotFilter(Filter, name="free_slot"):
    """Continuous batching: a replica takes a request only while it has a free slot and KV headroom."""

    Params: ClassVar[type[PolicyParams]] = KvHeadroomParams

    def _keep(self, request: RequestView, replica: ReplicaView) -> bool:
        return replica.free_slots > 0 and replica.kv_cache_usage <= self.params.max_kv_cache_usage


class SpillFilter(Filter, name="spill"):
    """Only the preferred site, unless the model's spill gate is open for this request."""

    def _keep(self, request: RequestView, replica: ReplicaView) -> bool:
        return replica.site_rank == 0 or request.allow_spill


# ---- scorers -------------------------------------------------------------------------


class Scorer(Policy, kind="scorer"):
    def score(self, request: RequestView, replicas: Sequence[ReplicaView]) -> list[float]:
        raise NotImplementedError


class SitePreferenceScorer(Scorer, name="site_preference"):
    """1 for the most preferred site, falling linearly to 0 for the least preferred present."""

    def score(self, request, replicas):
        worst = max((r.site_rank for r in replicas), default=0)
        return [1.0 if worst == 0 else 1.0 - r.site_rank / worst for r in replicas]


class FreeSlotsScorer(Scorer, name="free_slots"):
    """Share of the replica's slots that are free (least loaded scores highest)."""

    def score(self, request, replicas):
        return [r.free_slots / r.slots if r.slots else 0.0 for r in replicas]


class CostScorer(Scorer, name="cost"):
    """Cheapest replica 1, most expensive 0."""

    def score(self, request, replicas):
        costs = [r.cost_per_1k_tokens for r in replicas]
        low, high = min(costs, default=0.0), max(costs, default=0.0)
        return [1.0 if high == low else (high - c) / (high - low) for c in costs]


class AffinityScorer(Scorer, name="affinity"):
    """1 for the replica that last served the request's session (its KV prefix is warm there)."""

    def __init__(self, params: PolicyParams | None = None):
        super().__init__(params)
        self._last: dict[str, str] = {}

    def remember(self, affinity_key: str | None, replica_id: str) -> None:
        if affinity_key:
            self._last[affinity_key] = replica_id

    def forget_replica(self, replica_id: str) -> None:
        self._last = {k: v for k, v in self._last.items() if v != replica_id}

    def score(self, request, replicas):
        warm = self._last.get(request.affinity_key) if request.affinity_key else None
        return [1.0 if r.replica_id == warm else 0.0 for r in replicas]


# ---- picker --------------------------------------------------------------------------


class Picker(Policy, kind="picker"):
    def pick(self, replicas: Sequence[ReplicaView], scores: Sequence[float]) -> ReplicaView | None:
        raise NotImplementedError


class MaxScorePicker(Picker, name="max_score"):
    """Highest total score; ties go to the lower replica id, so decisions are reproducible."""

    def pick(self, replicas, scores):
        best = None
        for replica, score in zip(replicas, scores):
            if best is None or score > best[0] or (score == best[0] and replica.replica_id < best[1].replica_id):
                best = (score, replica)
        return None if best is None else best[1]


# ---- pipeline ------------------------------------------------------------------------


@dataclass
class Decision:
    replica: ReplicaView | None
    reason: str  # "preferred", "spill", or why nothing was picked
    considered: int = 0


DEFAULT_FILTERS = ("residency", "health", "free_slot", "spill")
DEFAULT_SCORERS = {"site_preference": 4.0, "affinity": 2.0, "free_slots": 1.0}


class PlacementPipeline:
    def __init__(self, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]], picker: Picker):
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    @classmethod
    def from_names(
        cls,
        filters: Sequence[str] = DEFAULT_FILTERS,
        scorers: dict[str, float] | None = None,
        picker: str = "max_score",
        params: dict[str, dict] | None = None,
    ) -> "PlacementPipeline":
        params = params or {}
        weights = DEFAULT_SCORERS if scorers is None else scorers
        return cls(
            [make(Filter, name, params.get(name)) for name in filters],
            [(make(Scorer, name, params.get(name)), weight) for name, weight in weights.items()],
            make(Picker, picker, params.get(picker)),
        )

    def scorer(self, name: str) -> Scorer | None:
        return next((s for s, _ in self.scorers if s.name == name), None)

    def place(self, request: RequestView, replicas: Sequence[ReplicaView]) -> Decision:
        candidates = [r for r in replicas if r.model == request.model]
        considered = len(candidates)
        for flt in self.filters:
            candidates = flt.filter(request, candidates)
            if not candidates:
                return Decision(None, f"no replica passed {flt.name}", considered)
        totals = [0.0] * len(candidates)
        for scorer, weight in self.scorers:
            for i, score in enumerate(scorer.score(request, candidates)):
                totals[i] += weight * score
        chosen = self.picker.pick(candidates, totals)
        if chosen is None:
            return Decision(None, "picker chose nothing", considered)
        affinity = self.scorer("affinity")
        if isinstance(affinity, AffinityScorer):
            affinity.remember(request.affinity_key, chosen.replica_id)
        return Decision(chosen, "preferred" if chosen.site_rank == 0 else "spill", considered)


# ---- spill gate ----------------------------------------------------------------------


class SpillParams(PolicyParams):
    spill_after_ms: float = Field(default=2_000, gt=0, description="Open when the predicted preferred-site wait exceeds this.")
    close_ratio: float = Field(default=0.5, gt=0, le=1, description="Close below spill_after_ms * close_ratio ...")
    min_hold_ms: float = Field(default=5_000, ge=0, description="... held for at least this long.")


@dataclass
class SpillGate:
    """Per-model hysteresis on the predicted wait for a slot at the preferred site."""

    params: SpillParams = field(default_factory=SpillParams)
    clock: Callable[[], float] = time.monotonic
    is_open: bool = False
    _below_since: float | None = None

    def update(self, predicted_wait_ms: float) -> bool:
        now = self.clock()
        if not self.is_open:
            if predicted_wait_ms > self.params.spill_after_ms:
                self.is_open, self._below_since = True, None
            return self.is_open
        if predicted_wait_ms < self.params.spill_after_ms * self.params.close_ratio:
            if self._below_since is None:
                self._below_since = now
            if (now - self._below_since) * 1000.0 >= self.params.min_hold_ms:
                self.is_open, self._below_since = False, None
        else:
            self._below_since = None
        return self.is_open


def predicted_wait_ms(queued_ahead: int, free_slots: int, total_slots: int, mean_service_ms: float) -> float:
    """Expected wait for a preferred-site slot: zero with a free slot, else the queue ahead drained
    at ``total_slots`` completions per mean service time."""
    if free_slots > queued_ahead:
        return 0.0
    if total_slots <= 0:
        return float("inf")
    return (queued_ahead - free_slots + 1) * mean_service_ms / total_slots
