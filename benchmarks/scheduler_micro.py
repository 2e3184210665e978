"""Micro-benchmark: cost of one admission + placement decision as the fleet grows.

    .venv/bin/python benchmarks/scheduler_micro.py [--decisions 5000]

The router places a request on an engine *group* (one model on one site; Serve picks the replica
inside it), so the decision's cost follows the number of groups, not of replicas. Two tables:

1. replicas: one model with 10, 100 and 1,000 replicas over two sites (a third on-prem), as a real
   fleet grows: two groups whose slots are replicas x max_num_seqs;
2. groups: the same with 10, 100 and 1,000 groups (as many sites), the pipeline's worst case.

Half of every group's slots are busy; a quarter of requests are confidential. A decision is one
``acquire`` (queue offer, spill-gate update, filter -> score -> pick over every group) plus its
``release``. Prints microseconds per decision (median and worst batch) and the growth factor.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.policy.admission import AdmissionParams  # noqa: E402
from serve_app.policy.classify import DataClass  # noqa: E402
from serve_app.policy.placement import PlacementPipeline, RequestView  # noqa: E402
from serve_app.policy.spill import SpillParams  # noqa: E402
from serve_app.router.groups import EngineGroup  # noqa: E402
from serve_app.router.scheduler import ModelScheduler  # noqa: E402

SLOTS_PER_REPLICA = 32
BATCH = 100


def make_scheduler(groups: int, replicas: int) -> ModelScheduler:
    """``replicas`` engine replicas spread over ``groups`` groups (a third of the groups on-prem)."""
    engine_groups = []
    per_group = max(1, replicas // groups)
    for i in range(groups):
        onprem = i % 3 == 0
        engine_groups.append(EngineGroup(
            f"m@g{i}", "m", "onprem" if onprem else "cloud", 0 if onprem else 1,
            DataClass.restricted if onprem else DataClass.internal, per_group, SLOTS_PER_REPLICA,
            0.0 if onprem else 0.5,
        ))
    scheduler = ModelScheduler("m", engine_groups, PlacementPipeline.from_names(),
                               AdmissionParams(max_queue_len=10_000, max_queue_wait_ms=60_000),
                               SpillParams(spill_after_ms=1_000, close_ratio=0.5, min_hold_ms=1_000))
    for group in engine_groups:  # half the fleet's sequences are taken by other routers
        scheduler.observe_engine_load(group.group_id, group.capacity // 2)
    return scheduler


async def measure(groups: int, replicas: int, decisions: int) -> list[float]:
    scheduler = make_scheduler(groups, replicas)
    requests = [RequestView(f"r{i}", "m", DataClass.confidential if i % 4 == 0 else DataClass.public,
                            affinity_key=f"user{i % 50}") for i in range(BATCH)]
    per_decision_us = []
    for _ in range(max(1, decisions // BATCH)):
        started = time.perf_counter()
        for request in requests:
            lease = await scheduler.acquire(request, max_tokens=64)
            lease.release()
        per_decision_us.append((time.perf_counter() - started) * 1e6 / BATCH)
    return per_decision_us


def table(title: str, rows: list[tuple[int, float, float]], unit: str) -> None:
    base = rows[0][1]
    print(f"\n{title}\n\n| {unit} | us per decision (median) | worst batch | growth |\n|---|---|---|---|")
    for size, median, worst in rows:
        print(f"| {size} | {median:.1f} | {worst:.1f} | {median / base:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=5_000)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    by_replicas, by_groups = [], []
    for size in sizes:
        batches = asyncio.run(measure(2, size, args.decisions))
        by_replicas.append((size, statistics.median(batches), max(batches)))
    for size in sizes:
        decisions = args.decisions if size < 1000 else max(BATCH, args.decisions // 5)
        batches = asyncio.run(measure(size, size, decisions))
        by_groups.append((size, statistics.median(batches), max(batches)))
    table("Replicas of one model over two sites (2 engine groups):", by_replicas, "replicas")
    table("Engine groups (model x site pairs), the pipeline's worst case:", by_groups, "engine groups")


if __name__ == "__main__":
    main()
