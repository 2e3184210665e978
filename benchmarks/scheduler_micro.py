"""Micro-benchmark: cost of one admission + placement decision as the fleet grows.

    .venv/bin/python benchmarks/scheduler_micro.py [--decisions 5000]

One model over 10, 100 and 1,000 engine groups (a third on-prem, the rest cloud), half of every
group's slots busy, a mix of public and confidential requests. Each decision is one
``acquire`` (queue offer, spill-gate update, filter -> score -> pick over every group) and its
``release``. Prints microseconds per decision (median and p99 over batches) and the ratio to 10
groups, so growth with the fleet is visible at a glance.
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
from serve_app.policy.pipeline import PlacementPipeline, RequestView, SpillParams  # noqa: E402
from serve_app.router.scheduler import EngineGroup, ModelScheduler  # noqa: E402

SLOTS_PER_GROUP = 32
BATCH = 100


def make_scheduler(groups: int) -> ModelScheduler:
    engine_groups = []
    for i in range(groups):
        onprem = i % 3 == 0
        engine_groups.append(EngineGroup(
            f"m@g{i}", "m", "onprem" if onprem else "cloud", 0 if onprem else 1,
            DataClass.restricted if onprem else DataClass.internal, SLOTS_PER_GROUP, 0.0 if onprem else 0.5,
        ))
    scheduler = ModelScheduler("m", engine_groups, PlacementPipeline.from_names(),
                               AdmissionParams(max_queue_len=10_000, max_queue_wait_ms=60_000),
                               SpillParams(spill_after_ms=1_000, close_ratio=0.5, min_hold_ms=1_000))
    for group in engine_groups:  # half the fleet's slots are taken by other routers
        scheduler.observe_engine_load(group.group_id, SLOTS_PER_GROUP // 2)
    return scheduler


async def measure(groups: int, decisions: int) -> list[float]:
    scheduler = make_scheduler(groups)
    requests = [RequestView(f"r{i}", "m", DataClass.confidential if i % 4 == 0 else DataClass.public,
                            affinity_key=f"user{i % 50}") for i in range(BATCH)]
    per_decision_us = []
    for _ in range(max(1, decisions // BATCH)):
        started = time.perf_counter()
        for request in requests:
            slot = await scheduler.acquire(request)
            scheduler.release(slot)
        per_decision_us.append((time.perf_counter() - started) * 1e6 / BATCH)
    return per_decision_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=5_000)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    rows = []
    for groups in [int(s) for s in args.sizes.split(",")]:
        batches = asyncio.run(measure(groups, args.decisions if groups < 1000 else max(BATCH, args.decisions // 5)))
        rows.append((groups, statistics.median(batches), max(batches)))
    base = rows[0][1]
    print("| engine groups | us per decision (median) | worst batch | vs first |")
    print("|---|---|---|---|")
    for groups, median, worst in rows:
        print(f"| {groups} | {median:.1f} | {worst:.1f} | {median / base:.1f}x |")


if __name__ == "__main__":
    main()
