"""Response-cache benchmark: the latency of a cache hit against a direct engine call, side by side
in one run.

    .venv/bin/python benchmarks/cache.py                  # starts vLLM's server and Spillway (peers.py)
    .venv/bin/python benchmarks/cache.py --no-start       # both already up on their ports

For each target, ``--requests`` sequential non-streamed chat requests at temperature 0 with
``--max-tokens`` output tokens: the same request again and again (on Spillway, every one after the
first on each router replica is a hit: only hits are counted), and new requests (each prompt
unique: vLLM's server and Spillway's misses compute every one). The table gives p50 and p90
latency and the ratio to the direct vLLM server's call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402 - the peer benchmark's targets and helpers


async def timed(session, url: str, prompt: str, max_tokens: int) -> tuple[float, str | None]:
    body = {"model": peers.MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
        return (time.perf_counter() - start) * 1000, resp.headers.get("x-spillway-cache")


async def measure(target, requests: int, max_tokens: int) -> dict:
    async with peers._session(1, target.headers) as session:
        same = f"cache benchmark {uuid.uuid4().hex[:8]}"
        repeated = [await timed(session, target.url, same, max_tokens) for _ in range(requests + 4)]
        fresh = [await timed(session, target.url, f"cache benchmark {uuid.uuid4().hex}", max_tokens)
                 for _ in range(requests)]
    hits = [ms for ms, cache in repeated if cache == "hit"]
    same_ms = hits if target.name.startswith("spillway") else [ms for ms, _ in repeated[4:]]
    return {"same": same_ms, "fresh": [ms for ms, _ in fresh], "hits": len(hits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="vllm,spillway")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-start", action="store_true")
    args = parser.parse_args()
    from deployments.sources import resolve_model_source

    targets = {name: peers.TARGETS[name]() for name in args.targets.split(",")}
    started = []
    try:
        if not args.no_start:
            for target in targets.values():
                print(f"starting {target.name} on {target.url} ...", flush=True)
                started.append(target)
                target.start(resolve_model_source("builtin:dense"))
                asyncio.run(peers.wait_ready(target.url, peers.START_TIMEOUT_S, getattr(target, "proc", None)))
        results = {name: asyncio.run(measure(t, args.requests, args.max_tokens)) for name, t in targets.items()}
    finally:
        for target in reversed(started):
            target.stop()
    ref = results.get("vllm", next(iter(results.values())))
    base = peers.percentile(ref["fresh"], 50)
    lines = [f"Cache benchmark, {time.strftime('%Y-%m-%d')}, {args.requests} sequential requests per column, "
             f"{args.max_tokens} output tokens, temperature 0; ratios to vllm's call of a new request",
             "", "| target | same request p50 ms | p90 | new requests p50 ms | p90 | hits |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        same50, fresh50 = peers.percentile(r["same"], 50), peers.percentile(r["fresh"], 50)
        lines.append(f"| {name} | {same50:.1f} ({same50 / base:.2f}x) | {peers.percentile(r['same'], 90):.1f} | "
                     f"{fresh50:.1f} ({fresh50 / base:.2f}x) | {peers.percentile(r['fresh'], 90):.1f} | {r['hits']} |")
    print("\n".join(lines))
    peers.RESULTS.mkdir(exist_ok=True)
    (peers.RESULTS / "cache.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
