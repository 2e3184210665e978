"""One command for a headless load test against a URL: Locust's CSVs plus the report.

    python -m loadtests.run --host http://127.0.0.1:8000 --scenario mixed -u 16 -t 60s
    python -m loadtests.run --host http://127.0.0.1:8000 --scenario burst        # ramps above on-prem

Scenarios: ``streaming`` (StreamingChatUser), ``mixed`` (every user class by weight),
``confidential`` (ConfidentialMixUser), ``tenants`` (MultiTenantUser), ``burst`` (every user
class under loadtests/burst_shape.py). Lengths: ``--max-tokens`` and ``--prompt-words`` take
distributions such as ``uniform:16-128`` (loadtests/distributions.py).
Writes ``<out>/locust_stats.csv`` (and Locust's other CSVs) and ``<out>/locust_report/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    "streaming": ["StreamingChatUser"],
    "mixed": [],
    "confidential": ["ConfidentialMixUser"],
    "tenants": ["MultiTenantUser"],
    "burst": [],
}


def locust_command(args: argparse.Namespace, out: Path) -> list[str]:
    files = str(HERE / "locustfile.py")
    if args.scenario == "burst":
        files += "," + str(HERE / "burst_shape.py")
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", args.host,
               "--csv", str(out / "locust"), "--csv-full-history", "--only-summary", "--loglevel", "WARNING"]
    if args.scenario != "burst":
        command += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration]
    return command + SCENARIOS[args.scenario]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    parser.add_argument("-u", "--users", type=int, default=16)
    parser.add_argument("-r", "--spawn-rate", type=float, default=8)
    parser.add_argument("-t", "--duration", default="60s")
    parser.add_argument("--model", default=os.environ.get("SPILLWAY_MODEL", "spillway-dense"))
    parser.add_argument("--max-tokens", default=os.environ.get("SPILLWAY_MAX_TOKENS", "64"))
    parser.add_argument("--prompt-words", default=os.environ.get("SPILLWAY_PROMPT_WORDS", "32"))
    parser.add_argument("--out", type=Path, default=None, help="default loadtests/results/<scenario>-<time>")
    args = parser.parse_args(argv)

    from loadtests.distributions import Distribution

    for spec in (args.max_tokens, args.prompt_words):
        Distribution.parse(spec)  # fail here, not in every Locust user
    out = args.out or HERE / "results" / f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPILLWAY_MODEL": args.model, "SPILLWAY_MAX_TOKENS": args.max_tokens,
           "SPILLWAY_PROMPT_WORDS": args.prompt_words}
    command = locust_command(args, out)
    print("running:", " ".join(command), flush=True)
    code = subprocess.call(command, env=env, cwd=HERE.parent)
    print(f"CSVs: {out}/locust_*.csv; report: {out}/locust_report/report.md")
    # Locust exits 1 when any request failed; the report says which and why.
    return code


if __name__ == "__main__":
    sys.exit(main())
