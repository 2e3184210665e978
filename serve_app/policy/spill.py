"""When a queued request leaves the preferred site: the TTFT budget, the predictor and the gate.

A request that may run elsewhere (residency allows it) spills when it would otherwise start on the
preferred site after its budget, ``spill_after_ms`` after it arrived. The scheduler decides this
from what is known at the moment, not from a mean of past requests:

- the preferred site's sequences: when each frees, from the requests running there (their
  ``max_tokens``, the tokens already streamed, their age) and the engines' measured time per
  token and to first token; sequences of other routers and the engines' own waiting count;
- the requests queued ahead, in order, each holding its sequences for its expected service time.

``SpillPredictor.simulate`` turns the free times into a simulation that answers "when would this
request start?" and then "it takes those sequences" for each queued request in turn. A request
whose start would miss its deadline spills at once, when a group elsewhere has room; a timer at the
earliest deadline makes sure no request waits past its budget because nothing else happened.

``SpillGate`` adds hysteresis: once requests spill on prediction, the deadline tightens to
``spill_after_ms * close_ratio`` until no request has been predicted over that for ``min_hold_ms``,
so traffic does not flap between sites at the edge of the budget.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from pydantic import Field

from serve_app.policy.registry import Policy, PolicyParams


class SpillParams(PolicyParams):
    spill_after_ms: float = Field(default=2_000, gt=0, description="TTFT budget: longest wait for the preferred site.")
    close_ratio: float = Field(default=0.5, gt=0, le=1, description="While spilling, the budget is this share ...")
    min_hold_ms: float = Field(default=5_000, ge=0, description="... until nothing was predicted over it this long.")
    margin_ms: float = Field(default=50, ge=0, description="Spill this long before the budget runs out.")
    prior_itl_ms: float = Field(default=30, gt=0, description="Time per output token until engines report theirs.")
    prior_ttft_ms: float = Field(default=250, gt=0, description="Time to first token until engines report theirs.")
    assumed_output_tokens: int = Field(
        default=256, gt=0, description="Output tokens of a request without max_tokens, until measured.")
    max_scan: int = Field(default=1024, gt=0, description="Queued requests examined per decision.")
    context_tokens: int | None = Field(
        default=None, gt=0, description="The model's context length: no answer runs longer, whatever max_tokens says.")


class SiteSimulation:
    """The preferred site's sequences as a heap of the times they free."""

    def __init__(self, now: float, free_at: list[float]):
        self.now = now
        self.capacity = len(free_at)
        self._heap = list(free_at)
        heapq.heapify(self._heap)

    def start(self, sequences: int) -> float:
        """When ``sequences`` of them would be free for the next request in line."""
        if sequences > self.capacity:
            return math.inf
        if sequences == 1:
            return max(self.now, self._heap[0])
        return max(self.now, heapq.nsmallest(sequences, self._heap)[-1])

    def take(self, sequences: int, service_ms: float) -> float:
        """The next request in line takes ``sequences`` for ``service_ms``; its start."""
        start = self.start(sequences)
        if math.isinf(start):
            return start
        for _ in range(sequences):
            heapq.heapreplace(self._heap, start + service_ms / 1000.0)
        return start


class SpillPredictor(Policy, kind="spill_predictor"):
    """Builds the simulation of the preferred site from its sequences' free times."""

    def simulate(self, now: float, free_at: list[float]) -> SiteSimulation:
        raise NotImplementedError


class BacklogPredictor(SpillPredictor, name="backlog"):
    """Each sequence frees when its request's remaining tokens are generated; queued requests take
    sequences in order, each for its expected service time."""

    def simulate(self, now: float, free_at: list[float]) -> SiteSimulation:
        return SiteSimulation(now, free_at)


@dataclass
class SpillGate:
    """Hysteresis on the budget."""

    params: SpillParams = field(default_factory=SpillParams)
    clock: Callable[[], float] = time.monotonic
    is_open: bool = False
    _quiet_since: float | None = None

    def budget_ms(self) -> float:
        """The wait a spillable request may have before it spills, margin included."""
        budget = self.params.spill_after_ms * (self.params.close_ratio if self.is_open else 1.0)
        return max(0.0, budget - self.params.margin_ms)

    def update(self, spilled_on_prediction: bool, pressure: bool) -> bool:
        """``spilled_on_prediction``: a request spilled before its deadline because its predicted
        start missed it; ``pressure``: some request was predicted past the tightened budget."""
        now = self.clock()
        if not self.is_open:
            if spilled_on_prediction:
                self.is_open, self._quiet_since = True, None
            return self.is_open
        if pressure or spilled_on_prediction:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        elif (now - self._quiet_since) * 1000.0 >= self.params.min_hold_ms:
            self.is_open, self._quiet_since = False, None
        return self.is_open
