"""Progressive rollouts: a canary's share of a model alias is raised in steps (for example
5 -> 25 -> 50 -> 100 %) while its server errors and time to first token stay within bounds of the
stable version; it is rolled back on its own when they do not.

- ``spillway rollout start`` (the admin API) hands a ``RolloutSpec`` to the operator deployment
  (``ops/operator.py``), which runs one ``Rollout`` per alias.
- The operator publishes the alias's weights in Ray's KV store; every router applies them within
  ``SPLIT_POLL_S`` (``SplitOverrides``). Users keep their variant while the weights do not change
  (sticky by ``user``), and a raised share only moves users from stable to canary.
- Routers report their per-variant counters (cumulative, per router) every second; a step is
  judged on what the counters grew since it began, summed over routers (a router that restarted
  starts again from zero, never negative).

A step passes once it lasted ``step_s`` and each variant served ``min_requests`` in it, with the
canary's server-error rate at most the stable's plus ``max_error_rate_delta`` and its mean TTFT at
most ``max_ttft_ratio`` times the stable's. A canary that breaks a bound once ``min_requests`` of
its requests are in rolls back at once, mid-step. A step that has not seen enough traffic by
``max_step_s`` rolls back too: no evidence, no promotion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from serve_app.config.base import Strict

SPLIT_KV_NAMESPACE = "spillway_splits"
SPLIT_POLL_S = 1.0

RUNNING, PROMOTED, ROLLED_BACK, ABORTED = "running", "promoted", "rolled_back", "aborted"


class RolloutSpec(Strict):
    alias: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
                       description="The model name clients send; it is served by the stable and canary variants.")
    stable: str = Field(description="The model that serves the alias now.")
    canary: str = Field(description="The model being rolled out.")
    steps: list[float] = Field(default=[5, 25, 50, 100], min_length=1, max_length=20,
                               description="Canary shares in percent, increasing, ending at 100.")
    step_s: float = Field(default=60.0, gt=0, le=86_400, description="Shortest time on each step.")
    max_step_s: float | None = Field(default=None, gt=0, le=86_400,
                                     description="Longest wait for enough traffic on a step (default 5 x step_s).")
    min_requests: int = Field(default=20, ge=1, le=1_000_000,
                              description="Requests each variant must serve on a step before it is judged.")
    max_error_rate_delta: float = Field(default=0.02, ge=0, le=1,
                                        description="Canary server-error rate may exceed the stable's by this much.")
    max_ttft_ratio: float = Field(default=1.5, ge=1, le=100,
                                  description="Canary mean TTFT may be at most this times the stable's.")

    @model_validator(mode="after")
    def _checks(self) -> "RolloutSpec":
        if self.stable == self.canary:
            raise ValueError("stable and canary must be different models")
        if any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(set(self.steps)) or self.steps[-1] != 100:
            raise ValueError("steps must be increasing percentages in (0, 100], ending at 100")
        if self.max_step_s is not None and self.max_step_s < self.step_s:
            raise ValueError("max_step_s must be at least step_s")
        return self

    @property
    def step_deadline_s(self) -> float:
        return self.max_step_s if self.max_step_s is not None else 5 * self.step_s


@dataclass
class Counts:
    """One variant's counters: requests, server errors (5xx), TTFT sum and count."""

    requests: int = 0
    errors: int = 0
    ttft_ms_total: float = 0.0
    ttft_count: int = 0

    @classmethod
    def of(cls, raw: dict) -> "Counts":
        return cls(int(raw.get("requests", 0)), int(raw.get("server_errors", 0)),
                   float(raw.get("ttft_ms_total", 0.0)), int(raw.get("ttft_count", 0)))

    def minus(self, other: "Counts") -> "Counts":
        if self.requests < other.requests:  # the router restarted: its counters began again
            return Counts(self.requests, self.errors, self.ttft_ms_total, self.ttft_count)
        return Counts(self.requests - other.requests, max(0, self.errors - other.errors),
                      max(0.0, self.ttft_ms_total - other.ttft_ms_total), max(0, self.ttft_count - other.ttft_count))

    def plus(self, other: "Counts") -> "Counts":
        return Counts(self.requests + other.requests, self.errors + other.errors,
                      self.ttft_ms_total + other.ttft_ms_total, self.ttft_count + other.ttft_count)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_ttft_ms(self) -> float | None:
        return self.ttft_ms_total / self.ttft_count if self.ttft_count else None

    def as_dict(self) -> dict:
        ttft = self.mean_ttft_ms
        return {"requests": self.requests, "server_errors": self.errors, "error_rate": round(self.error_rate, 4),
                "mean_ttft_ms": None if ttft is None else round(ttft, 1)}


RouterCounts = dict[str, dict[str, Counts]]  # router -> variant -> cumulative counts


@dataclass
class Rollout:
    """One alias's rollout. Pure: the operator passes the time and the routers' counters."""

    spec: RolloutSpec
    started_at: float
    state: str = RUNNING
    step: int = 0
    step_started_at: float = 0.0
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    _baseline: RouterCounts = field(default_factory=dict, repr=False)
    _last_window: dict[str, Counts] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.step_started_at = self.started_at
        self._event(self.started_at, f"started at {self.share}% canary")

    @property
    def share(self) -> float:
        """The canary's share now, in percent."""
        if self.state == PROMOTED:
            return 100.0
        if self.state in (ROLLED_BACK, ABORTED):
            return 0.0
        return self.spec.steps[self.step]

    def weights(self) -> dict[str, float]:
        return {self.spec.stable: 100.0 - self.share, self.spec.canary: self.share}

    def begin(self, routers: RouterCounts) -> None:
        self._baseline = _copy(routers)

    def window(self, routers: RouterCounts) -> dict[str, Counts]:
        """What each variant served since this step began, summed over routers."""
        totals = {self.spec.stable: Counts(), self.spec.canary: Counts()}
        for router, by_variant in routers.items():
            base = self._baseline.get(router, {})
            for variant in totals:
                if variant in by_variant:
                    totals[variant] = totals[variant].plus(by_variant[variant].minus(base.get(variant, Counts())))
        return totals

    def advance(self, now: float, routers: RouterCounts) -> bool:
        """Judge the running step; returns whether the weights changed."""
        if self.state != RUNNING:
            return False
        window = self._last_window = self.window(routers)
        stable, canary = window[self.spec.stable], window[self.spec.canary]
        enough_canary = canary.requests >= self.spec.min_requests
        breach = self._breach(stable, canary) if enough_canary else None
        if breach is not None and (stable.requests >= self.spec.min_requests or canary.error_rate > self.spec.max_error_rate_delta):
            return self._finish(now, ROLLED_BACK, f"step {self.share}%: {breach}")
        elapsed = now - self.step_started_at
        if elapsed < self.spec.step_s:
            return False
        stable_needed = self.spec.min_requests if self.share < 100 else 0
        if not enough_canary or stable.requests < stable_needed:
            if elapsed >= self.spec.step_deadline_s:
                return self._finish(now, ROLLED_BACK, f"step {self.share}%: too little traffic to judge in "
                                    f"{self.spec.step_deadline_s:.0f}s (canary {canary.requests}, stable "
                                    f"{stable.requests} requests; {self.spec.min_requests} needed)")
            return False
        if breach is not None:
            return self._finish(now, ROLLED_BACK, f"step {self.share}%: {breach}")
        if self.step + 1 >= len(self.spec.steps):
            return self._finish(now, PROMOTED, "every step within bounds")
        self.step += 1
        self.step_started_at = now
        self._baseline = _copy(routers)
        self._event(now, f"raised to {self.share}% canary")
        return True

    def abort(self, now: float, reason: str = "aborted by an operator") -> None:
        if self.state == RUNNING:
            self._finish(now, ABORTED, reason)

    def _breach(self, stable: Counts, canary: Counts) -> str | None:
        if canary.error_rate > stable.error_rate + self.spec.max_error_rate_delta:
            return (f"canary server-error rate {canary.error_rate:.1%} > stable {stable.error_rate:.1%} "
                    f"+ {self.spec.max_error_rate_delta:.1%}")
        if canary.mean_ttft_ms is not None and stable.mean_ttft_ms is not None \
                and canary.mean_ttft_ms > stable.mean_ttft_ms * self.spec.max_ttft_ratio:
            return (f"canary mean TTFT {canary.mean_ttft_ms:.0f} ms > {self.spec.max_ttft_ratio:g} x stable "
                    f"{stable.mean_ttft_ms:.0f} ms")
        return None

    def _finish(self, now: float, state: str, reason: str) -> bool:
        self.state, self.reason = state, reason
        self._event(now, f"{state}: {reason}")
        return True

    def _event(self, now: float, what: str) -> None:
        self.history.append({"at_s": round(now - self.started_at, 1), "event": what})

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "alias": self.spec.alias, "stable": self.spec.stable, "canary": self.spec.canary, "state": self.state,
            "canary_percent": self.share, "weights": self.weights(), "step": self.step + 1, "steps": self.spec.steps,
            "step_elapsed_s": round(now - self.step_started_at, 1) if self.state == RUNNING else None,
            "reason": self.reason, "window": {v: c.as_dict() for v, c in self._last_window.items()},
            "history": list(self.history), "spec": self.spec.model_dump(),
        }


def _copy(routers: RouterCounts) -> RouterCounts:
    return {router: dict(by_variant) for router, by_variant in routers.items()}


def split_key(app: str, alias: str) -> str:
    return f"{app}/{alias}"
