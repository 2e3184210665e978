"""Classification benchmark: what scanning a body costs, and what it costs the router's event loop.

    .venv/bin/python benchmarks/classify.py [--repeat 5]

1. Cost per KB of ``scan_request`` (strict decode, shape checks, normalisation, the nine PII
   detectors over every string), on ordinary and on hostile bodies of 16 KiB to 1 MiB.
2. The event loop while a 1 MiB hostile body is scanned, side by side in one run: the production
   path (``Scanner``: inline up to 16 KiB, a helper process above) against scanning inline. A
   ticker that wakes every millisecond records how late it woke; the p99 and the worst lateness
   are what any other request on that router would have waited.

Prints the tables last; writes benchmarks/results/classify.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.pipeline.scan import ScanSpec, scan_request  # noqa: E402
from serve_app.pipeline.scanner import Scanner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KIB = 1024
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris 2024. ")


def chat(content: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def bodies(size: int) -> dict[str, bytes]:
    """Bodies of about ``size`` bytes: ordinary ones, then hostile ones."""
    reps = max(1, size // len(LOREM))
    return {
        "prose": chat(LOREM * reps),
        "prose + PII at the end": chat(LOREM * reps + " mail jane.doe@example.com"),
        "conversation (100 messages)": json.dumps({"model": "m", "messages": [
            {"role": "user" if i % 2 else "assistant", "content": LOREM * max(1, reps // 100)} for i in range(100)]}).encode(),
        "hostile: 'a.' repeated": chat("a." * (size // 2)),
        "hostile: '1 ' repeated": chat("1 " * (size // 2)),
        "hostile: zero-width + accents": chat("e\u0301\u200b4" * (size // 8)),
        "hostile: tiny objects": (b'{"model":"m","messages":[{"role":"user","content":"x"}],"junk":['
                                  + b"{}," * (size // 3) + b"{}]}"),
    }


def cost_table(repeat: int) -> list[tuple[str, int, float, float]]:
    rows = []
    spec = ScanSpec()
    for size in (16 * KIB, 256 * KIB, 1024 * KIB):
        for name, body in bodies(size).items():
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                result = scan_request(body, "chat", spec)
                times.append(time.perf_counter() - started)
            assert result.status in (200, 400)
            median = statistics.median(times)
            rows.append((name, len(body), median * 1000, median * 1e6 / (len(body) / KIB)))
    return rows


async def loop_lag(scanner: Scanner, body: bytes, repeat: int) -> tuple[float, float, float]:
    """(p99 lateness ms, worst lateness ms, mean scan ms) of a 1 ms ticker while scanning."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(max(0.0, time.perf_counter() - before - 0.001))

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    scans = []
    for _ in range(repeat):
        started = time.perf_counter()
        await scanner.scan(body, "chat")
        scans.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)
    stop.set()
    await task
    lags.sort()
    return lags[int(0.99 * (len(lags) - 1))] * 1000, lags[-1] * 1000, statistics.mean(scans) * 1000


async def lag_table(repeat: int) -> list[tuple[str, float, float, float, float, float, float]]:
    production = Scanner(ScanSpec(), inline_max_bytes=16 * KIB, workers=1)
    inline = Scanner(ScanSpec(), inline_max_bytes=1 << 30)
    await production.warm()
    rows = []
    try:
        for name, body in bodies(1024 * KIB).items():
            if not name.startswith("hostile"):
                continue
            p99, worst, scan_ms = await loop_lag(production, body, repeat)
            base_p99, base_worst, base_scan_ms = await loop_lag(inline, body, repeat)
            rows.append((name, p99, worst, scan_ms, base_p99, base_worst, base_scan_ms))
    finally:
        await production.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    costs = cost_table(args.repeat)
    lags = asyncio.run(lag_table(args.repeat))
    lines = ["Scan cost (scan_request, median of runs):", "",
             "| body | size | ms | us per KB |", "|---|---|---|---|"]
    lines += [f"| {name} | {size / KIB:.0f} KiB | {ms:.1f} | {per_kb:.1f} |" for name, size, ms, per_kb in costs]
    lines += ["", "Event loop while a 1 MiB hostile body is scanned (ticker lateness; production path vs inline):", "",
              "| body | p99 ms | worst ms | scan ms | inline p99 ms | inline worst ms | inline scan ms | worst, ratio |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {p99:.2f} | {worst:.2f} | {scan:.0f} | {bp99:.2f} | {bworst:.2f} | {bscan:.0f} | "
              f"{worst / bworst:.3f}x |" for name, p99, worst, scan, bp99, bworst, bscan in lags]
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "classify.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
