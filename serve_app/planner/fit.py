"""An engine profile fitted to a recorded run: how the engines of one (model, site) served the
load test's requests (``requests.jsonl``) under that run's own conditions.

``spillway plan profile`` times a replica alone, with one light client: what it does on a node
of its own. Where the load generator, the routers and other engines share the machine (the local
cluster on 2 cores), the same replica serves a real run much slower, and that is what a replay of
that kind of run must be given. This fit reads it from a run:

- a request held a sequence from its engine start (its start plus its wait in the router's queue,
  ``queue_ms``) to its end; the batch it met is the sequences running on the site then (itself
  included) over the site's replicas (the router sends to the least loaded), rounded up;
- time to first token at that batch: ``ttft_ms - queue_ms`` (the router's queue is the
  simulator's own part);
- time per output token at that batch: ``(e2e_ms - ttft_ms) / (output_tokens - 1)``, the whole
  stream at the batch it started with, as the simulator models it.

Medians per bucket of batch sizes (``batch_points``: 1, 2, 4, ... up to ``max_num_seqs``; a bucket
takes the batches above the one before it) with at least ``min_samples`` streams. Traffic of one prompt size does
not separate prefill from the rest, so the prefill speed comes from a measured profile (``base``):
the fitted overhead is the median first token at batch 1 less that prefill of the median prompt.

What a client sees is not only the engine: a load generator starved of CPU reads late, and a
stream's tokens then arrive in one read (no time per token at all, and a "first token" that is
when the client got round to reading). A stream of several tokens that came faster than
``MIN_ITL_MS`` per token says nothing of the engine's speed or its first token: it is left out of
both fits. A bucket left without enough such streams keeps the base profile's time per token, and
its first token is interpolated from the buckets beside it (``EngineProfile``).

Fit on one run and compare on another: fitted and compared on the same run, the figures would
agree by construction.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from serve_app.planner.profile import EngineProfile, batch_points

MIN_ITL_MS = 0.2  # below this per token, a stream arrived at once: the client read late


def read_as_sent(itl_ms: float | None) -> bool:
    """Whether the client read a stream as its events came (``itl_ms`` None: one token, nothing
    to tell), not in one go after the fact."""
    return itl_ms is None or itl_ms >= MIN_ITL_MS


@dataclass(frozen=True)
class Served:
    engine_start: float  # s (wall clock of the run)
    end: float
    ttft_ms: float | None  # engine side: the router's queue taken out; None: not streamed
    itl_ms: float | None
    prompt_tokens: int | None


def served_on(records: list[dict], model: str, site: str) -> list[Served]:
    """The run's successful requests of ``model`` served on ``site``."""
    out = []
    for r in records:
        if not r.get("ok") or r.get("model") != model or r.get("site") != site:
            continue
        if not isinstance(r.get("start"), (int, float)) or not isinstance(r.get("end"), (int, float)):
            continue
        queue_s = (r.get("queue_ms") or 0.0) / 1000
        ttft = r.get("ttft_ms")
        engine_ttft = max(0.0, ttft - 1000 * queue_s) if isinstance(ttft, (int, float)) else None
        tokens, e2e = r.get("output_tokens") or 0, r.get("e2e_ms")
        itl = ((e2e - ttft) / (tokens - 1) if engine_ttft is not None and isinstance(e2e, (int, float))
               and tokens > 1 and e2e >= ttft else None)
        out.append(Served(r["start"] + queue_s, r["end"], engine_ttft, itl, r.get("prompt_tokens")))
    return out


def batches(served: list[Served], replicas: int) -> list[int]:
    """For each request, the sequences per replica when it started on the engine (itself included;
    of requests that started at the same instant, those listed first count as running)."""
    order = sorted(range(len(served)), key=lambda i: served[i].engine_start)
    ends = sorted(s.end for s in served)
    out = [1] * len(served)
    ended = 0
    for started_before, i in enumerate(order):
        at = served[i].engine_start
        while ended < len(ends) and ends[ended] <= at:
            ended += 1
        running = max(0, started_before - ended)
        out[i] = max(1, math.ceil((running + 1) / max(1, replicas)))
    return out


def _by_bucket(values: list[tuple[int, float]], points: list[int], min_samples: int) -> dict[int, float]:
    table = {}
    low = 0
    for point in points:
        here = [v for b, v in values if low < b <= point]
        if len(here) >= min_samples:
            table[point] = statistics.median(here)
        low = point
    return table


def fit(records: list[dict], model: str, site: str, replicas: int, max_num_seqs: int, base: EngineProfile,
        name: str, source: str, min_samples: int = 5) -> EngineProfile:
    """The profile of ``model`` on ``site`` as the recorded run's engines served it."""
    served = served_on(records, model, site)
    if not served:
        raise ValueError(f"the run has no successful request of {model} served on {site}")
    met = batches(served, replicas)
    points = batch_points(max_num_seqs)
    timed = [(b, s) for b, s in zip(met, served) if s.ttft_ms is not None]
    live = [(b, s) for b, s in timed if read_as_sent(s.itl_ms)]
    ttft = _by_bucket([(b, s.ttft_ms) for b, s in live], points, min_samples)
    itl = _by_bucket([(b, s.itl_ms) for b, s in live if s.itl_ms is not None], points, min_samples)
    # A bucket whose streams a starved client read in one go: the base profile's time per token.
    for point in _by_bucket([(b, s.itl_ms) for b, s in timed if s.itl_ms is not None], points, min_samples):
        itl.setdefault(point, base.itl_at(point))
    if not ttft or not itl:
        raise ValueError(f"too few streamed requests of {model} on {site} to fit a profile "
                         f"(at least {min_samples} per batch size needed; {len(served)} served)")
    first = ttft[min(ttft)]
    prompts = [s.prompt_tokens for s in served if s.prompt_tokens]
    prefill_ms = 1000 * statistics.median(prompts) / base.prefill_tokens_per_s if prompts else 0.0
    return EngineProfile(
        name=name, source=source, max_num_seqs=max_num_seqs, prefill_tokens_per_s=base.prefill_tokens_per_s,
        ttft_overhead_ms=round(max(0.0, first - prefill_ms), 1),
        itl_ms={b: round(ms, 2) for b, ms in itl.items()},
        ttft_extra_ms={b: round(max(0.0, ms - first), 1) for b, ms in ttft.items()})
