"""Routing benchmark: Spillway's router vs power-of-two across both sites vs on-prem only.

Same engines, same load, one run. The three policies run in alternation against one cluster
(the router's benchmark modes, enabled only in benchmarks/routing.yaml), each through a steady
phase (below on-prem capacity) and a burst phase (several times on-prem capacity). A share of
the requests is confidential (header), so residency violations are counted.

    .venv/bin/python benchmarks/routing.py                 # starts its own two-site cluster
    .venv/bin/python benchmarks/routing.py --url http://127.0.0.1:8800   # against a running one

Prints a table (p50/p99 TTFT, output tokens/s, on-prem share, residency violations, cost, and
for Spillway the TTFT budget misses), then the two figures the spill-over is judged by:

- budget-miss share: spillable (not confidential) requests that waited in the router past the
  model's ``spill_after_ms`` while a group elsewhere had room for them, as counted by the router
  (``/v1/spillway/scheduler``), over all spillable requests it admitted in the burst; goal at most
  1 %. The client-side upper bound is printed beside it: spillable requests served on-prem after
  a queue wait past the budget, room elsewhere or not;
- burst p99 TTFT of Spillway against on-prem only, on the same engines; goal 0.5x.

It also writes a PNG of TTFT and on-prem share over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
MODES = {"spillway": None, "pow2": "pow2", "onprem-only": "onprem-only"}


@dataclass
class Sample:
    mode: str
    phase: str
    started: float
    ttft_s: float | None
    tokens: int
    site: str | None
    data_class: str | None
    confidential: bool
    status: int
    queue_ms: float = 0.0


async def sse_events(resp: httpx.Response):
    """SSE data payloads as bytes. Split on the blank line between events, not on text line
    breaks: generated text may hold U+2028 and friends, which text line splitters cut at."""
    buffer = b""
    async for chunk in resp.aiter_bytes():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                yield event[6:]


API_KEY = os.environ.get("SPILLWAY_API_KEY")  # a cluster with keys needs one


async def one_request(http: httpx.AsyncClient, model: str, mode_header: str | None, confidential: bool,
                      max_tokens: int, t0: float, mode: str, phase: str) -> Sample:
    headers = {"authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    if mode_header:
        headers["x-spillway-routing"] = mode_header
    if confidential:
        headers["x-data-classification"] = "confidential"
    body = {"model": model, "messages": [{"role": "user", "content": f"benchmark {random.random()}"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    ttft = None
    tokens = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            site, data_class = resp.headers.get("x-spillway-site"), resp.headers.get("x-spillway-data-class")
            queue_ms = float(resp.headers.get("x-spillway-queue-ms") or 0)
            if resp.status_code != 200:
                await resp.aread()
                return Sample(mode, phase, started - t0, None, 0, site, data_class, confidential, resp.status_code)
            async for data in sse_events(resp):
                if data == b"[DONE]":
                    continue
                event = json.loads(data)
                if ttft is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    ttft = time.monotonic() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return Sample(mode, phase, started - t0, ttft, tokens, site, data_class, confidential, 200, queue_ms)
    except httpx.HTTPError:
        return Sample(mode, phase, started - t0, None, 0, None, None, confidential, 599)


async def scheduler_counts(http: httpx.AsyncClient, model: str, routers: int) -> dict[str, int]:
    """Spillable requests admitted and budget misses, summed over the router replicas (each answer
    comes from one replica; ask until every one has answered)."""
    seen: dict[str, dict] = {}
    for _ in range(50 * routers):
        report = (await http.get("/v1/spillway/scheduler")).json()
        seen[report["router_replica"]] = report["models"][model]
        if len(seen) >= routers:
            break
    return {key: sum(m[key] for m in seen.values()) for key in ("spillable_admitted", "budget_misses")}


async def run_phase(base_url: str, model: str, mode: str, phase: str, users: int, duration_s: float,
                    max_tokens: int, confidential_share: float, t0: float, routers: int) -> tuple[list[Sample], float, dict]:
    samples: list[Sample] = []
    deadline = time.monotonic() + duration_s
    rng = random.Random(hash((mode, phase)) & 0xFFFF)

    async def user():
        while time.monotonic() < deadline:
            samples.append(await one_request(http, model, MODES[mode], rng.random() < confidential_share,
                                             max_tokens, t0, mode, phase))

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        before = await scheduler_counts(http, model, routers)
        started = time.monotonic()
        await asyncio.gather(*(user() for _ in range(users)))
        elapsed = time.monotonic() - started
        after = await scheduler_counts(http, model, routers)
        return samples, elapsed, {k: after[k] - before[k] for k in after}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(samples: list[Sample], elapsed_s: float, prices: dict[str, float], counts: dict,
              spill_after_ms: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
    tokens = sum(s.tokens for s in ok)
    onprem = sum(1 for s in ok if s.site == "onprem")
    spillable = [s for s in ok if not s.confidential]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "tokens_per_s": tokens / elapsed_s if elapsed_s else 0.0,
        "onprem_share": onprem / len(ok) if ok else 0.0,
        "violations": sum(1 for s in ok if s.confidential and s.site != "onprem"),
        "cost": sum(s.tokens / 1000 * prices.get(s.site or "", 0.0) for s in ok),
        "budget_misses": counts["budget_misses"],
        "spillable_admitted": counts["spillable_admitted"],
        "waited_past_budget": sum(1 for s in spillable if s.site == "onprem" and s.queue_ms > spill_after_ms),
        "spillable": len(spillable),
    }


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    header = f"{'policy':12s} {'phase':7s} {'reqs':>5s} {'err':>4s} {'TTFT p50':>9s} {'TTFT p99':>9s} " \
             f"{'tok/s':>7s} {'on-prem':>8s} {'violations':>10s} {'cost':>8s} {'budget misses':>14s}"
    print(header)
    print("-" * len(header))
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for mode, phase, r in rows:
        print(f"{mode:12s} {phase:7s} {r['requests']:5d} {r['errors']:4d} {fmt(r['ttft_p50_ms']):>9s} "
              f"{fmt(r['ttft_p99_ms']):>9s} {r['tokens_per_s']:7.0f} {r['onprem_share']:8.0%} "
              f"{r['violations']:10d} {r['cost']:8.4f} "
              f"{_share(r['budget_misses'], r['spillable_admitted']) if mode == 'spillway' else '-':>14s}")


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_share) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = {"spillway": "tab:green", "pow2": "tab:orange", "onprem-only": "tab:blue"}
    for mode, color in colors.items():
        ok = sorted((s for s in samples if s.mode == mode and s.ttft_s is not None), key=lambda s: s.started)
        if not ok:
            continue
        ax_ttft.scatter([s.started for s in ok], [s.ttft_s * 1000 for s in ok], s=6, color=color, label=mode)
        window = 20
        xs, ys = [], []
        for i in range(len(ok)):
            chunk = ok[max(0, i - window + 1): i + 1]
            xs.append(ok[i].started)
            ys.append(sum(s.site == "onprem" for s in chunk) / len(chunk))
        ax_share.plot(xs, ys, color=color, label=mode)
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.set_yscale("log")
    ax_ttft.legend()
    ax_share.set_ylabel("on-prem share (last 20)")
    ax_share.set_xlabel("seconds since start (policies run in turn: steady, then burst)")
    ax_share.set_ylim(-0.05, 1.05)
    fig.suptitle("Spillway routing benchmark")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def benchmark(args, base_url: str, prices: dict[str, float], spill_after_ms: float, routers: int) -> None:
    t0 = time.monotonic()
    all_samples: list[Sample] = []
    pooled: dict[tuple[str, str], dict] = {}
    phases = [("steady", args.steady_users), ("burst", args.burst_users)]
    for round_index in range(args.rounds):
        modes = list(MODES)
        modes = modes[round_index % len(modes):] + modes[:round_index % len(modes)]  # rotate the order
        for mode in modes:
            for phase, users in phases:
                samples, elapsed, counts = await run_phase(base_url, args.model, mode, phase, users, args.duration_s,
                                                           args.max_tokens, args.confidential_share, t0, routers)
                all_samples += samples
                cell = pooled.setdefault((mode, phase), {"samples": [], "elapsed": 0.0,
                                                         "counts": {"budget_misses": 0, "spillable_admitted": 0}})
                cell["samples"] += samples
                cell["elapsed"] += elapsed
                for key, value in counts.items():
                    cell["counts"][key] += value
                await asyncio.sleep(args.pause_s)  # let queues drain and the spill gate settle
    # Every round's samples pooled per (policy, phase): a p99 from one 30 s round is its 5th worst request.
    rows = [(mode, phase, summarize(pooled[(mode, phase)]["samples"], pooled[(mode, phase)]["elapsed"], prices,
                                    pooled[(mode, phase)]["counts"], spill_after_ms))
            for mode in MODES for phase, _ in phases]
    print()
    print(f"model {args.model}; {args.steady_users} users steady, {args.burst_users} users burst; {args.rounds} rounds x "
          f"{args.duration_s:.0f}s per phase, pooled; {args.max_tokens} output tokens; "
          f"{args.confidential_share:.0%} confidential; spill_after_ms {spill_after_ms:.0f}; "
          f"prices per 1k tokens {prices}")
    print_table(rows)
    by = {(mode, phase): r for mode, phase, r in rows}
    burst = by[("spillway", "burst")]
    print(f"\nbudget-miss share, burst (router's count; goal <= 1 %): "
          f"{_share(burst['budget_misses'], burst['spillable_admitted'])} "
          f"({burst['budget_misses']} of {burst['spillable_admitted']} spillable requests)")
    print(f"  upper bound seen by the client (served on-prem after waiting past the budget, room elsewhere or not): "
          f"{_share(burst['waited_past_budget'], burst['spillable'])}")
    ours, onprem_only = burst["ttft_p99_ms"], by[("onprem-only", "burst")]["ttft_p99_ms"]
    if ours and onprem_only:
        print(f"burst p99 TTFT, Spillway vs on-prem only (goal 0.5x): {ours:.0f} / {onprem_only:.0f} ms = "
              f"{ours / onprem_only:.2f}x")
    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(all_samples, png)
    png.with_suffix(".json").write_text(json.dumps({"rows": rows, "samples": [vars(s) for s in all_samples]}))
    print(f"\nplot: {png}; samples: {png.with_suffix('.json')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running Spillway with router.benchmark_modes: true")
    parser.add_argument("--config", default=str(HERE / "routing.yaml"))
    parser.add_argument("--model", default="spillway-dense")
    parser.add_argument("--steady-users", type=int, default=2, help="below on-prem capacity (4 slots)")
    parser.add_argument("--burst-users", type=int, default=16, help="several times on-prem capacity")
    parser.add_argument("--duration-s", type=float, default=30)
    parser.add_argument("--pause-s", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="policies alternate; samples are pooled over rounds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--confidential-share", type=float, default=0.25)
    parser.add_argument("--png", default=str(HERE / "results" / "routing.png"))
    args = parser.parse_args()

    from serve_app.config import load_config
    from serve_app.governance.cost import CostModel

    config = load_config(args.config)
    costs = CostModel(config)  # price of 1,000 output tokens per site, from the config's cost model
    prices = {site: costs.per_1k_output(args.model, site) for site in config.model(args.model).replicas}
    spill_after_ms = config.model(args.model).spill_after_ms
    routers = config.router.replicas
    if args.url:
        asyncio.run(benchmark(args, args.url, prices, spill_after_ms, routers))
        return
    from serve_app.ops.deploy import deploy
    from serve_app.ops.local_cluster import LocalCluster

    cluster = LocalCluster(config, state_file=HERE / "results" / "cluster.json")
    cluster.start()
    try:
        deploy(config, cluster.address)
        asyncio.run(benchmark(args, f"http://{config.http.host}:{config.http.port}", prices, spill_after_ms, routers))
    finally:
        import ray

        ray.shutdown()
        cluster.stop()


if __name__ == "__main__":
    main()
