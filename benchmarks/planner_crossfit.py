"""The planner's fitted profiles judged across runs: every recorded run of ``planner_accuracy.py``
(its calibration run and its compared run) fitted once, and each fit replayed against every other
run. With one pair only, a fit that happens to suit that pair looks good; across all pairs, the
median error and its spread say what the fit is worth on this machine.

    .venv/bin/python benchmarks/planner_crossfit.py          # the runs under benchmarks/results/
    .venv/bin/python benchmarks/planner_crossfit.py DIR ...  # given planner-accuracy-* folders

Prints, per metric, the median error, the median of its absolute value and the range.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "serve_app.ops.cli"]
CONFIG = str(ROOT / "cluster_configs" / "local.yaml")


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or sorted((ROOT / "benchmarks" / "results").glob("planner-accuracy-*"))
    runs = [(f"{folder.name[-15:]}/{name}", folder / name / "locust_report" / "requests.jsonl", folder / "profile.yaml")
            for folder in folders for name in ("fit-run", "run")
            if (folder / name / "locust_report" / "requests.jsonl").exists() and (folder / "profile.yaml").exists()]
    if len(runs) < 2:
        sys.exit("needs at least two recorded runs (benchmarks/planner_accuracy.py writes them)")
    errors: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fits = {}
        for i, (name, trace, base) in enumerate(runs):
            fits[name] = Path(tmp) / f"fit-{i}.yaml"
            subprocess.run(CLI + ["plan", "profile", "--config", CONFIG, "--from-trace", str(trace), "--base", str(base),
                                  "--out", str(fits[name])], check=True, capture_output=True, cwd=ROOT)
        for (fitted, _, _), (_, trace, _) in itertools.permutations(runs, 2):
            done = subprocess.run(CLI + ["plan", "accuracy", "--config", CONFIG, "--profiles", str(fits[fitted]),
                                         "--trace", str(trace), "--json"],
                                  check=True, capture_output=True, text=True, cwd=ROOT)
            for row in json.loads(done.stdout)["rows"]:
                if row["error"] is not None:
                    errors.setdefault(row["metric"], []).append(row["error"])
    print(f"{len(runs)} runs, {len(runs) * (len(runs) - 1)} (fit, compared) pairs; relative errors "
          f"(pairs where the measured figure is 0 left out)")
    print("| metric | pairs | median error | median abs error | range |\n|---|---:|---:|---:|---:|")
    for metric, values in errors.items():
        print(f"| {metric} | {len(values)} | {100 * statistics.median(values):+.1f} % | "
              f"{100 * statistics.median(abs(v) for v in values):.1f} % | "
              f"{100 * min(values):+.0f} .. {100 * max(values):+.0f} % |")


if __name__ == "__main__":
    main()
