"""How close the planner comes to a real run: the load test's ``requests.jsonl`` replayed through
the simulator, its figures set against what the run measured.

Like is compared with like: TTFT percentiles over the streamed requests that succeeded (the only
ones with a measured TTFT), the simulated TTFT of those same requests; on-prem and spill shares
over the requests served (a spill is any ``x-spillway-spill-reason`` other than ``none``); and the
wait in the router's queue (``x-spillway-queue-ms``), the part of TTFT that is the router's own
decision, apart from what the engines and the machine add.

TTFT is also compared over the streams the client read as they came (``live_ttft_*``): a stream
of several tokens whose events all arrived within ``fit.MIN_ITL_MS`` per token was read in one go,
after the fact. Its measured first token is when the load generator got round to reading (on a
2-core machine that runs the load generator beside the engines, a burst's first second has such
streams by the dozen, with "first tokens" of seconds and an inter-token latency of 0); the
simulator models the router and the engines, not the load generator. Both sets of rows are shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.planner.fit import read_as_sent
from serve_app.planner.sim import SimResult, percentile
from serve_app.planner.traffic import Trace

METRICS = ("ttft_p50_ms", "ttft_p99_ms", "live_ttft_p50_ms", "live_ttft_p99_ms", "onprem_share", "spill_share",
           "queue_p99_ms")


@dataclass(frozen=True)
class Row:
    metric: str
    measured: float | None
    simulated: float | None

    @property
    def error(self) -> float | None:
        """Relative error of the simulated figure (None where the measured one is 0 or missing)."""
        if self.measured in (None, 0) or self.simulated is None:
            return None
        return (self.simulated - self.measured) / self.measured

    @property
    def difference(self) -> float | None:
        return None if self.measured is None or self.simulated is None else self.simulated - self.measured


def _having(trace: Trace, key: str) -> list[int]:
    """Indices of the records that succeeded and recorded a number under ``key``."""
    return [i for i, r in enumerate(trace.records) if r.get("ok") and isinstance(r.get(key), (int, float))]


def _live(trace: Trace) -> list[int]:
    """Indices of the timed streams the client read as they came (one token, or at least
    ``fit.MIN_ITL_MS`` per token between the first and the last)."""
    live = []
    for i in _having(trace, "ttft_ms"):
        record = trace.records[i]
        several = (record.get("output_tokens") or 0) > 1
        if read_as_sent((record.get("itl_ms") or 0.0) if several else None):
            live.append(i)
    return live


def measured_figures(trace: Trace, onprem_sites: set[str]) -> dict:
    records = trace.records
    timed = [records[i]["ttft_ms"] for i in _having(trace, "ttft_ms")]
    live = [records[i]["ttft_ms"] for i in _live(trace)]
    served = [r for r in records if r.get("ok") and r.get("site")]
    spilled = [r for r in served if r.get("spill_reason") not in (None, "none")]
    return {
        "ttft_p50_ms": percentile(timed, 50), "ttft_p99_ms": percentile(timed, 99),
        "live_ttft_p50_ms": percentile(live, 50), "live_ttft_p99_ms": percentile(live, 99),
        "queue_p99_ms": percentile([records[i]["queue_ms"] for i in _having(trace, "queue_ms")], 99),
        "onprem_share": sum(r["site"] in onprem_sites for r in served) / len(served) if served else None,
        "spill_share": len(spilled) / len(served) if served else None,
        "ttft_samples": len(timed), "live_ttft_samples": len(live),
    }


def simulated_figures(trace: Trace, result: SimResult, onprem_sites: set[str]) -> dict:
    timed, live = _having(trace, "ttft_ms"), _live(trace)
    summary = result.summary(onprem_sites)
    queued = [result.queue_ms[i] for i in _having(trace, "queue_ms") if result.queue_ms[i] is not None]
    return {"ttft_p50_ms": result.percentile(50, timed), "ttft_p99_ms": result.percentile(99, timed),
            "live_ttft_p50_ms": result.percentile(50, live), "live_ttft_p99_ms": result.percentile(99, live),
            "queue_p99_ms": percentile(queued, 99),
            "onprem_share": summary["onprem_share"], "spill_share": summary["spill_share"]}


def compare(trace: Trace, result: SimResult, onprem_sites: set[str]) -> list[Row]:
    measured, simulated = measured_figures(trace, onprem_sites), simulated_figures(trace, result, onprem_sites)
    return [Row(metric, measured[metric], simulated[metric]) for metric in METRICS]


def run_to_run(compared: Trace, other: Trace, onprem_sites: set[str]) -> list[Row]:
    """Two measured runs of the same traffic, as rows (``measured``: the compared run,
    ``simulated``: the other): how far the real cluster is from itself, the floor under any
    simulator's error on this machine."""
    a, b = measured_figures(compared, onprem_sites), measured_figures(other, onprem_sites)
    return [Row(metric, a[metric], b[metric]) for metric in METRICS]


def _show(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if metric.endswith("_ms") else f"{100 * value:.1f} %"


def _error(row: Row) -> str:
    if row.error is not None:
        return f"{100 * row.error:+.1f} %"
    if row.difference is not None:
        return f"{100 * row.difference:+.1f} pts" if not row.metric.endswith("_ms") else f"{row.difference:+.1f} ms"
    return "-"


def table(rows: list[Row], columns: tuple[str, str, str] = ("measured", "simulated", "error")) -> str:
    """A Markdown table: metric, measured, simulated, error (relative; points where measured is 0)."""
    lines = [f"| metric | {' | '.join(columns)} |", "|---|---:|---:|---:|"]
    lines += [f"| {r.metric} | {_show(r.metric, r.measured)} | {_show(r.metric, r.simulated)} | {_error(r)} |"
              for r in rows]
    return "\n".join(lines)
