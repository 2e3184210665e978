"""Placement scorers: a score in [0, 1] per engine group, 1 best; the pipeline weights and sums them."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Sequence

from pydantic import Field

from serve_app.policy.lru import BoundedLru
from serve_app.policy.registry import Policy, PolicyParams

if TYPE_CHECKING:
    from serve_app.policy.placement import GroupView, RequestView


class Scorer(Policy, kind="scorer"):
    def score(self, request: "RequestView", groups: Sequence["GroupView"]) -> list[float]:
        raise NotImplementedError


class SitePreferenceScorer(Scorer, name="site_preference"):
    """1 for the most preferred site, falling linearly to 0 for the least preferred present."""

    def score(self, request, groups):
        worst = max((g.site_rank for g in groups), default=0)
        return [1.0 if worst == 0 else 1.0 - g.site_rank / worst for g in groups]


class FreeSlotsScorer(Scorer, name="free_slots"):
    """Share of the group's sequences that are free (least loaded scores highest)."""

    def score(self, request, groups):
        return [g.free / g.capacity if g.capacity else 0.0 for g in groups]


class CostScorer(Scorer, name="cost"):
    """Cheapest group 1, most expensive 0."""

    def score(self, request, groups):
        costs = [g.cost_per_1k_tokens for g in groups]
        low, high = min(costs, default=0.0), max(costs, default=0.0)
        return [1.0 if high == low else (high - c) / (high - low) for c in costs]


class AffinityParams(PolicyParams):
    max_keys: int = Field(default=100_000, gt=0, description="Sessions remembered per router replica (LRU).")
    ttl_s: float = Field(default=600.0, gt=0, description="A session's last group is forgotten after this long.")


class AffinityScorer(Scorer, name="affinity"):
    """1 for the group that last served the request's session (its KV prefix is warm there). The
    memory is bounded: least recently used sessions, and sessions idle past ``ttl_s``, are gone."""

    Params: ClassVar[type[PolicyParams]] = AffinityParams

    def __init__(self, params: PolicyParams | None = None):
        super().__init__(params)
        self.last: BoundedLru[str, str] = BoundedLru(self.params.max_keys, self.params.ttl_s)

    def remember(self, affinity_key: str | None, group_id: str) -> None:
        if affinity_key:
            self.last.put(affinity_key, group_id)

    def forget_group(self, group_id: str) -> None:
        self.last.drop_values(group_id)

    def score(self, request, groups):
        warm = self.last.get(request.affinity_key) if request.affinity_key else None
        return [1.0 if g.group_id == warm else 0.0 for g in groups]


DEFAULT_SCORERS = {"site_preference": 4.0, "affinity": 2.0, "free_slots": 1.0}
