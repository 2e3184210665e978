"""Planner accuracy: the same traffic on the local cluster and in the simulator, side by side.

    ./dev run                                            # the local two-site cluster on :8000
    .venv/bin/python benchmarks/planner_accuracy.py      # profile, load test, replay, table

1. ``spillway plan profile``: the dense model's profile, measured through the router on the idle
   cluster (time per token at batch 1 .. max_num_seqs, prefill from a long and a short prompt).
2. A calibration run (Locust's burst shape, the same as the compared run's unless ``--fit-*`` say
   otherwise, but a run of its own) and ``spillway plan profile --from-trace``: the profile the
   engines showed under that kind of load (the load generator, routers and four engines on the
   same cores; ``planner/fit.py``).
3. ``loadtests/run.py --scenario burst``: the compared run, Locust's burst shape (base load, a
   burst above the on-prem slots, base again), every request logged to ``requests.jsonl``.
4. ``spillway plan accuracy``: that log replayed through the router's own scheduler over simulated
   engines, once with each profile; p50 and p99 TTFT, on-prem share and spill share against what
   Locust measured. The fitted profile comes from a different run than the one compared.
5. Where the calibration run has the compared run's shape (the default), the two measured runs
   side by side: how far the cluster is from itself with the same traffic, the floor under any
   simulator's error here.

Prints the tables (Markdown, with date and machine) and writes them with the runs to ``--out``.
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
    parser.add_argument("--fit-base-users", help="the calibration run's base users (default: --base-users)")
    parser.add_argument("--fit-burst-users", help="the calibration run's burst users (default: --burst-users)")
    parser.add_argument("--fit-stage-s", help="default: --stage-s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        f"planner-accuracy-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.fit_base_users = args.fit_base_users or args.base_users
    args.fit_burst_users = args.fit_burst_users or args.burst_users
    args.fit_stage_s = args.fit_stage_s or args.stage_s
    cli = [sys.executable, "-m", "serve_app.ops.cli"]
    profiles = args.out / "profile.yaml"
    run(cli + ["plan", "profile", "--config", args.config, "--host", args.host, "--out", str(profiles)])
    if not profiles.exists():
        sys.exit("profile measurement failed (is `./dev run` serving on --host?)")
    calibration = load_test(args, "fit-run", args.fit_base_users, args.fit_burst_users, args.fit_stage_s)
    fitted = args.out / "fitted.yaml"
    run(cli + ["plan", "profile", "--config", args.config, "--from-trace", str(calibration), "--base", str(profiles),
               "--out", str(fitted)])
    if not fitted.exists():
        sys.exit("the profile fit failed")
    trace = load_test(args, "run", args.base_users, args.burst_users, args.stage_s)
    tables = [run(cli + ["plan", "accuracy", "--config", args.config, "--profiles", str(path), "--trace", str(trace)])
              for path in (profiles, fitted)]
    header = (f"Planner accuracy, {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, "
              f"CPU engines): Locust burst shape ({args.base_users} -> {args.burst_users} -> {args.base_users} "
              f"users, {args.stage_s} s stages), max_tokens {args.max_tokens}, prompt words {args.prompt_words}")
    text = (f"{header}\n\nWith the profile measured on the idle cluster:\n\n{tables[0]}\n"
            f"With the profile fitted to a calibration run ({args.fit_base_users} -> {args.fit_burst_users} -> "
            f"{args.fit_base_users} users, {args.fit_stage_s} s stages):\n\n{tables[1]}")
    if (args.fit_base_users, args.fit_burst_users, args.fit_stage_s) == (args.base_users, args.burst_users,
                                                                         args.stage_s):
        text += ("\nThe same traffic measured twice (the compared run against the calibration run):\n\n"
                 + run_to_run_table(args.config, trace, calibration) + "\n")
    (args.out / "accuracy.md").write_text(text)
    print(text)


def run_to_run_table(config_path: str, compared: Path, other: Path) -> str:
    from serve_app.config import SiteKind, load_config
    from serve_app.planner.accuracy import run_to_run, table
    from serve_app.planner.traffic import replay

    config = load_config(config_path)
    onprem = {s.name for s in config.sites if s.kind == SiteKind.onprem}
    return table(run_to_run(replay(compared), replay(other), onprem),
                 columns=("compared run", "calibration run", "difference"))


def load_test(args, name: str, base_users: str, burst_users: str, stage_s: str) -> Path:
    """A Locust burst run; its requests.jsonl."""
    run([sys.executable, "-m", "loadtests.run", "--host", args.host, "--scenario", "burst",
         "--max-tokens", args.max_tokens, "--prompt-words", args.prompt_words, "--out", str(args.out / name)],
        env={"SPILLWAY_BASE_USERS": base_users, "SPILLWAY_BURST_USERS": burst_users, "SPILLWAY_STAGE_S": stage_s})
    trace = args.out / name / "locust_report" / "requests.jsonl"
    if not trace.exists():
        sys.exit(f"the load test wrote no {trace}")
    return trace


if __name__ == "__main__":
    main()
