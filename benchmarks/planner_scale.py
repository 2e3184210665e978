"""Planner scale: how fast the simulator replays traffic through the router's own scheduler.

    .venv/bin/python benchmarks/planner_scale.py                      # 1,000 replicas, 2,000 req/s, 30 s
    .venv/bin/python benchmarks/planner_scale.py --rate 2000 --duration-s 3600   # the issue's full hour

A two-site fleet of one model (``--onprem`` and ``--cloud`` replicas of ``--slots`` sequences each),
Poisson arrivals, output lengths log-normal around 200 tokens, every replica an H100 serving
Llama-3.1-8B (the published profile ``h100-llama-3.1-8b`` in cluster_configs/profiles/published-gpu.yaml).
Prints simulated requests and events per second of real time, and the simulated figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import yaml

from serve_app.config import SpillwayConfig
from serve_app.planner.profile import EngineProfile
from serve_app.planner.sim import Simulation
from serve_app.planner.traffic import poisson

PROFILES = Path(__file__).resolve().parent.parent / "cluster_configs" / "profiles" / "published-gpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onprem", type=int, default=600)
    parser.add_argument("--cloud", type=int, default=400)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--rate", type=float, default=2_000)
    parser.add_argument("--duration-s", type=float, default=30)
    args = parser.parse_args()
    config = SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1}],
        "models": [{"id": "m", "source": "org/model", "replicas": {"onprem": args.onprem, "cloud": args.cloud},
                    "engine": {"max_num_seqs": args.slots}}]})
    published = yaml.safe_load(PROFILES.read_text())["profiles"]["h100-llama-3.1-8b"]
    profile = EngineProfile(name="h100-llama-3.1-8b", **{**published, "max_num_seqs": args.slots})
    requests = poisson("m", args.rate, args.duration_s, max_tokens="lognormal:200,0.5")
    started = time.perf_counter()
    result = Simulation(config, {("m", "onprem"): profile, ("m", "cloud"): profile}).run(requests)
    wall_s = time.perf_counter() - started
    print(f"planner scale, {platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}: "
          f"{args.onprem + args.cloud} replicas, {args.rate:g} req/s for {args.duration_s:g} simulated s")
    print(f"{len(requests)} requests, {result.events} events in {wall_s:.1f} s of real time: "
          f"{len(requests) / wall_s:,.0f} requests/s, {result.events / wall_s:,.0f} events/s; "
          f"one simulated hour at this rate would take {args.rate * 3600 / (len(requests) / wall_s) / 60:.0f} min")
    print(json.dumps(result.summary({"onprem"})))


if __name__ == "__main__":
    main()
