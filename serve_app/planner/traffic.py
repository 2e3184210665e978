"""Traffic for the simulator: Poisson arrivals, bursts on top of them, and the prompt and output
lengths drawn from the same distributions the Locust scripts use (``loadtests/distributions.py``);
or a recorded trace replayed: the load test's ``requests.jsonl``."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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


# What the load test saw that the planner replays: the request reached admission (served, or
# turned away for load). Other statuses (auth, validation, residency refusals) never took a slot.
REPLAYED_STATUSES = {200, 429, 503}
MAX_TRACE_BYTES = 512 * 1024 * 1024


@dataclass
class Trace:
    """A recorded run as the simulator's requests, and the records they came from (same order)."""

    requests: list[SimRequest] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> records left out
    prompt_tokens_estimated: int = 0  # records without a usage count (failures): the median given


def replay(path: str | Path, *, models: dict[str, str] | None = None) -> Trace:
    """The load test's per-request log (``loadtests/locustfile.py``'s ``requests.jsonl``) as
    arrivals: each at its recorded start (relative to the first), with its model (renamed through
    ``models``), recorded prompt tokens, ``max_tokens``, tokens generated (``max_tokens`` where it
    failed) and the data class the router gave it."""
    path = Path(path)
    if path.is_dir():
        path = path / "requests.jsonl"
    if path.stat().st_size > MAX_TRACE_BYTES:
        raise ValueError(f"trace {path} is over {MAX_TRACE_BYTES >> 20} MiB")
    trace, rows = Trace(), []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            trace.skipped["unreadable line"] += 1  # (a run cut off mid-line)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("start"), (int, float)) or not record.get("model"):
            trace.skipped["no start or model"] += 1
        elif record.get("status") not in REPLAYED_STATUSES:
            trace.skipped[f"status {record.get('status')}"] += 1
        elif record.get("data_class") not in (None, *DataClass.__members__):
            trace.skipped["unknown data class"] += 1
        else:
            rows.append(record)
    known = [r["prompt_tokens"] for r in rows if isinstance(r.get("prompt_tokens"), int) and r["prompt_tokens"] > 0]
    fallback = int(statistics.median(known)) if known else 1
    rows.sort(key=lambda r: r["start"])
    t0 = rows[0]["start"] if rows else 0.0
    for record in rows:
        prompt_tokens = record.get("prompt_tokens")
        if not isinstance(prompt_tokens, int) or prompt_tokens <= 0:
            prompt_tokens = fallback
            trace.prompt_tokens_estimated += 1
        output = record.get("output_tokens") or 0
        max_tokens = record.get("max_tokens") or output or 1
        if not record.get("ok") or output <= 0:
            output = max_tokens
        model = (models or {}).get(record["model"], record["model"])
        trace.requests.append(SimRequest(record["start"] - t0, model, prompt_tokens, max_tokens, output,
                                         DataClass.parse(record.get("data_class"))))
        trace.records.append(record)
    return trace
