"""Planner accuracy: the same traffic on the local cluster and in the simulator, side by side.

    ./dev run                                            # the local two-site cluster on :8000
    .venv/bin/python benchmarks/planner_accuracy.py      # profile, load test, replay, table

1. ``spillway plan profile``: the dense model's profile, measured through the router on the idle
   cluster (time per token at batch 1 .. max_num_seqs, prefill from a long and a short prompt).
2. ``loadtests/run.py --scenario burst``: Locust's burst shape (base load, a burst above the
   on-prem slots, base again), every request logged to ``requests.jsonl``.
3. ``spillway plan accuracy``: that log replayed through the router's own scheduler over simulated
   engines with the measured profile; p50 and p99 TTFT, on-prem share and spill share against what
   Locust measured.

Prints the table (Markdown, with date and machine) and writes it with the run to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str], env: dict | None = None) -> str:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--config", default=str(ROOT / "cluster_configs" / "local.yaml"))
    parser.add_argument("--base-users", default="4")
    parser.add_argument("--burst-users", default="48")
    parser.add_argument("--stage-s", default="30")
    parser.add_argument("--max-tokens", default="uniform:32-96")
    parser.add_argument("--prompt-words", default="lognormal:32,0.5")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        f"planner-accuracy-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "serve_app.ops.cli"]
    profiles = args.out / "profile.yaml"
    run(cli + ["plan", "profile", "--config", args.config, "--host", args.host, "--out", str(profiles)])
    if not profiles.exists():
        sys.exit("profile measurement failed (is `./dev run` serving on --host?)")
    run([sys.executable, "-m", "loadtests.run", "--host", args.host, "--scenario", "burst",
         "--max-tokens", args.max_tokens, "--prompt-words", args.prompt_words, "--out", str(args.out / "run")],
        env={"SPILLWAY_BASE_USERS": args.base_users, "SPILLWAY_BURST_USERS": args.burst_users,
             "SPILLWAY_STAGE_S": args.stage_s})
    trace = args.out / "run" / "locust_report" / "requests.jsonl"
    if not trace.exists():
        sys.exit(f"the load test wrote no {trace}")
    out = run(cli + ["plan", "accuracy", "--config", args.config, "--profiles", str(profiles), "--trace", str(trace)])
    header = (f"Planner accuracy, {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, "
              f"CPU engines): Locust burst shape ({args.base_users} -> {args.burst_users} -> {args.base_users} "
              f"users, {args.stage_s} s stages), max_tokens {args.max_tokens}, prompt words {args.prompt_words}")
    (args.out / "accuracy.md").write_text(header + "\n\n" + out)
    print(header)
    print(out)


if __name__ == "__main__":
    main()
