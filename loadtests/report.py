"""Load-test report: a table and plots over time from the per-request log the Locust users write.

    python -m loadtests.report <run dir>        (re-render a finished run)

Inputs in the run directory: ``requests.jsonl`` (one line per request: start/end, user class,
tenant, status, TTFT, ITL, end-to-end, prompt and output tokens, ``max_tokens``, serving site,
data class, spill reason, router queue wait; ``spillway plan simulate --trace`` replays it) and
``scheduler.jsonl`` (the routers' queue depth, sampled every second). Outputs: ``report.md``, ``report.json`` and
PNGs: ``ttft.png`` (TTFT p50/p90/p99 over time), ``throughput.png`` (output tokens/s),
``queue_depth.png`` and ``site_share.png``.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

WINDOW_S = 5.0


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short when the run was killed
    return rows


def summarize(records: list[dict], duration_s: float) -> dict:
    ttft = [r["ttft_ms"] for r in records if r.get("ttft_ms") is not None and r["ok"]]
    itl = [r["itl_ms"] for r in records if r.get("itl_ms") is not None and r["ok"]]
    e2e = [r["e2e_ms"] for r in records if r["ok"]]
    errors = sum(1 for r in records if not r["ok"])
    tokens = sum(r.get("output_tokens") or 0 for r in records if r["ok"])
    sites = Counter(r.get("site") or "none" for r in records if r["ok"])
    served = sum(sites.values())
    return {
        "requests": len(records),
        "errors": errors,
        "error_rate": errors / len(records) if records else 0.0,
        "ttft_ms": {f"p{p}": percentile(ttft, p) for p in (50, 90, 99)},
        "itl_ms": {f"p{p}": percentile(itl, p) for p in (50, 90, 99)},
        "e2e_ms": {f"p{p}": percentile(e2e, p) for p in (50, 99)},
        "output_tokens": tokens,
        "tokens_per_s": tokens / duration_s if duration_s > 0 else 0.0,
        "site_share": {site: n / served for site, n in sorted(sites.items())} if served else {},
    }


def build_report(run_dir: Path, title: str = "Spillway load test") -> dict:
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "requests.jsonl")
    samples = read_jsonl(run_dir / "scheduler.jsonl")
    if records:
        t0 = min(r["start"] for r in records)
        duration_s = max(r["end"] for r in records) - t0
    else:
        t0, duration_s = 0.0, 0.0
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["kind"]].append(r)
    summary = {
        "title": title,
        "duration_s": round(duration_s, 1),
        "all": summarize(records, duration_s),
        "by_user_class": {kind: summarize(rows, duration_s) for kind, rows in sorted(groups.items())},
        "by_tenant": {tenant: summarize(rows, duration_s) for tenant, rows in sorted(_by(records, "tenant").items())},
        "max_queue_depth": max((s["queued"] for s in samples), default=0),
    }
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "report.md").write_text(render_markdown(summary))
    if records:
        plot(records, samples, t0, run_dir)
    return summary


def _by(records: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get(key):
            out[r[key]].append(r)
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(name: str, s: dict) -> str:
    share = " / ".join(f"{site} {share:.0%}" for site, share in s["site_share"].items()) or "-"
    return (f"| {name} | {s['requests']} | {s['error_rate']:.1%} | {_fmt(s['ttft_ms']['p50'])} | "
            f"{_fmt(s['ttft_ms']['p90'])} | {_fmt(s['ttft_ms']['p99'])} | {_fmt(s['itl_ms']['p50'], 1)} | "
            f"{_fmt(s['itl_ms']['p90'], 1)} | {_fmt(s['itl_ms']['p99'], 1)} | {s['tokens_per_s']:.0f} | {share} |")


def render_markdown(summary: dict) -> str:
    head = ("| traffic | requests | errors | TTFT p50 ms | TTFT p90 | TTFT p99 | ITL p50 ms | ITL p90 | ITL p99 | "
            "tokens/s | share per site |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"# {summary['title']}", "", f"Duration {summary['duration_s']} s; "
             f"deepest router queue {summary['max_queue_depth']}.", "", head, table_rows("all", summary["all"])]
    lines += [table_rows(kind, s) for kind, s in summary["by_user_class"].items()]
    if len(summary["by_tenant"]) > 1:
        lines += ["", "Per tenant:", "", head]
        lines += [table_rows(tenant, s) for tenant, s in summary["by_tenant"].items()]
    lines += ["", "Plots: ttft.png, throughput.png, queue_depth.png, site_share.png", ""]
    return "\n".join(lines)


def plot(records: list[dict], samples: list[dict], t0: float, run_dir: Path, window_s: float = WINDOW_S) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        windows[int((r["end"] - t0) // window_s)].append(r)
    xs = sorted(windows)
    times = [(w + 0.5) * window_s for w in xs]

    fig, ax = plt.subplots(figsize=(8, 4))
    for p in (50, 90, 99):
        ax.plot(times, [percentile([r["ttft_ms"] for r in windows[w] if r["ok"] and r.get("ttft_ms") is not None], p)
                        for w in xs], marker=".", label=f"p{p}")
    _finish(ax, fig, "TTFT over time", "ms", run_dir / "ttft.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(times, [sum(r.get("output_tokens") or 0 for r in windows[w] if r["ok"]) / window_s for w in xs],
            marker=".", label="output tokens/s")
    _finish(ax, fig, "Throughput", "tokens/s", run_dir / "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    if samples:
        ax.plot([s["t"] - t0 for s in samples], [s["queued"] for s in samples], label="router queue (all models)")
        ax.plot([s["t"] - t0 for s in samples], [s.get("in_flight", 0) for s in samples], label="on engines")
    _finish(ax, fig, "Queue depth", "requests", run_dir / "queue_depth.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    sites = sorted({r.get("site") or "none" for r in records if r["ok"]})
    bottom = [0.0] * len(xs)
    for site in sites:
        shares = []
        for w in xs:
            ok = [r for r in windows[w] if r["ok"]]
            shares.append(sum(1 for r in ok if (r.get("site") or "none") == site) / len(ok) if ok else 0.0)
        ax.bar(times, shares, width=window_s * 0.9, bottom=bottom, label=site)
        bottom = [b + s for b, s in zip(bottom, shares)]
    _finish(ax, fig, "Share of requests per site", "share", run_dir / "site_share.png")


def _finish(ax, fig, title: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m loadtests.report <run dir>")
    print(render_markdown(build_report(Path(sys.argv[1]))))
