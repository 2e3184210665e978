"""Traffic for the simulator: Poisson arrivals, bursts on top of them, and the prompt and output
lengths drawn from the same distributions the Locust scripts use (``loadtests/distributions.py``)."""

from __future__ import annotations

import random

from loadtests.distributions import Distribution
from serve_app.planner.sim import SimRequest
from serve_app.policy.classify import DataClass


def poisson(model: str, rate_per_s: float, duration_s: float, *, prompt_tokens: str = "lognormal:256,0.6",
            max_tokens: str = "64", confidential_share: float = 0.0, seed: int = 0,
            bursts: list[tuple[float, float, float]] = ()) -> list[SimRequest]:
    """Arrivals at ``rate_per_s`` for ``duration_s``; ``bursts``: (start_s, length_s, extra rate per
    second) added on top. Each request generates its ``max_tokens`` (as the load tests' ignore_eos)."""
    rng = random.Random(seed)
    prompt_dist, max_dist = Distribution.parse(prompt_tokens), Distribution.parse(max_tokens)

    def rate_at(t: float) -> float:
        return rate_per_s + sum(extra for start, length, extra in bursts if start <= t < start + length)

    peak = rate_per_s + sum(extra for _, _, extra in bursts)
    requests, t = [], 0.0
    while True:
        t += rng.expovariate(peak)  # thinning: candidates at the peak rate, kept at rate(t) / peak
        if t >= duration_s:
            return requests
        if rng.random() * peak > rate_at(t):
            continue
        out = max_dist.sample(rng)
        data_class = DataClass.confidential if rng.random() < confidential_share else DataClass.public
        requests.append(SimRequest(t, model, prompt_dist.sample(rng), out, out, data_class))
