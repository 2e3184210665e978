"""Placement as a pipeline: Filter -> Score -> Pick, over a snapshot of engine-group views.

Contracts (as in llm-d's scheduler):
- a ``Filter`` (``policy/filters.py``) keeps the groups a request may run on now (residency,
  health, free sequences, spill); an empty result means "not now", never "anywhere else";
- a ``Scorer`` (``policy/scorers.py``) returns a score in [0, 1] per group (1 is best); the
  pipeline sums them with the configured weights;
- the ``Picker`` turns the weighted scores into one group, or None.

A group is one (model, site) engine deployment; its capacity is the sequences its healthy
replicas run at once (``replicas x max_num_seqs``), and a request takes ``n x prompts`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from serve_app.policy.classify import DataClass
from serve_app.policy.filters import DEFAULT_FILTERS, Filter
from serve_app.policy.registry import Policy, make
from serve_app.policy.scorers import DEFAULT_SCORERS, AffinityScorer, Scorer


@dataclass(frozen=True)
class GroupView:
    """What the router knows of one engine group at decision time."""

    group_id: str
    model: str
    site: str
    site_rank: int  # 0 = most preferred site (on-prem first)
    trusted_up_to: DataClass  # the most sensitive data class this site may process
    capacity: int  # sequences its healthy replicas run at once
    in_flight: int  # sequences the router fleet has on it now
    healthy: bool = True
    kv_cache_usage: float = 0.0
    cost_per_1k_tokens: float = 0.0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.in_flight)


@dataclass(frozen=True)
class RequestView:
    request_id: str
    model: str
    data_class: DataClass = DataClass.public
    affinity_key: str | None = None  # session / user: the group that served it holds its KV prefix
    allow_spill: bool = False  # set by the scheduler for this decision
    sequences: int = 1


class Picker(Policy, kind="picker"):
    def pick(self, groups: Sequence[GroupView], scores: Sequence[float]) -> GroupView | None:
        raise NotImplementedError


class MaxScorePicker(Picker, name="max_score"):
    """Highest total score; ties go to the lower group id, so decisions are reproducible."""

    def pick(self, groups, scores):
        best = None
        for group, score in zip(groups, scores):
            if best is None or score > best[0] or (score == best[0] and group.group_id < best[1].group_id):
                best = (score, group)
        return None if best is None else best[1]


@dataclass
class Decision:
    group: GroupView | None
    reason: str  # "preferred", "spill", or why nothing was picked
    considered: int = 0


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

    def place(self, request: RequestView, groups: Sequence[GroupView]) -> Decision:
        candidates = [g for g in groups if g.model == request.model]
        considered = len(candidates)
        for flt in self.filters:
            candidates = flt.filter(request, candidates)
            if not candidates:
                return Decision(None, f"no group passed {flt.name}", considered)
        if len(candidates) == 1 and type(self.picker) is MaxScorePicker:
            chosen = candidates[0]  # (the highest score of one: scoring cannot change the answer)
        else:
            totals = [0.0] * len(candidates)
            for scorer, weight in self.scorers:
                for i, score in enumerate(scorer.score(request, candidates)):
                    totals[i] += weight * score
            chosen = self.picker.pick(candidates, totals)
        if chosen is None:
            return Decision(None, "picker chose nothing", considered)
        affinity = self.scorer("affinity")
        if isinstance(affinity, AffinityScorer):
            affinity.remember(request.affinity_key, chosen.group_id)
        return Decision(chosen, "preferred" if chosen.site_rank == 0 else "spill", considered)
