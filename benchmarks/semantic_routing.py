"""Semantic routing benchmark: accuracy, the latency the routing step adds, and the cost it saves.

    ./dev run                                          # the embedded default, serving `auto` on :8000
    .venv/bin/python benchmarks/semantic_routing.py    # ~300 labelled prompts, a few minutes

Every prompt of ``benchmarks/data/routing_prompts.yaml`` (labelled legal, code or general; none of
them an anchor of the route) goes to the running cluster twice, in alternating order:
- to the alias (``auto``): the router embeds it with MiniLM and picks a target; the
  ``x-spillway-route`` header says which, with the cosine score and the routing step's own time;
- straight to the model that target names: the baseline, the same request without routing.
Both ask for one token (``max_tokens=1``), so the difference is the routing step, not generation.

Printed: accuracy per route and a confusion table; p50/p99 of the routing step (router-side) and
of the end-to-end latency with and without routing (client-side, same run); and the cost of the
routed traffic against sending everything to the default ("general") target, under the configured
prices and, as a scenario, with the general model on a managed API at ``--api-price`` per million
input/output tokens and the specialists where the config runs them. Output tokens are not measured
(one token each here): ``--output-tokens`` is the assumed answer length per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "routing_prompts.yaml"
API_KEY = os.environ.get("SPILLWAY_API_KEY")  # a cluster with keys needs one


def parse_route(header: str) -> dict:
    """``x-spillway-route``: ``<target>; score=<s>; reason=<r>[; fallback_from=<m>]; ms=<t>``."""
    target, *fields = [part.strip() for part in header.split(";")]
    route = {"target": target, **dict(field.split("=", 1) for field in fields)}
    for key in ("score", "ms"):
        if key in route:
            route[key] = float(route[key])
    return route


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def confusion(rows: list[dict], labels: list[str]) -> tuple[dict, str]:
    """Accuracy per expected route and the confusion table (rows: expected, columns: chosen)."""
    table = Counter((row["expected"], row["route"]["target"]) for row in rows)
    chosen = labels + sorted({t for _, t in table} - set(labels))
    width = max(10, *(len(label) for label in chosen))
    lines = ["expected \\ chosen".ljust(20) + "".join(label.rjust(width) for label in chosen) + "   accuracy"]
    accuracy = {}
    for label in labels:
        total = sum(table[(label, other)] for other in chosen)
        accuracy[label] = table[(label, label)] / total if total else float("nan")
        lines.append(label.ljust(20) + "".join(str(table[(label, other)]).rjust(width) for other in chosen)
                     + f"   {accuracy[label]:9.1%}")
    accuracy["all"] = sum(table[(label, label)] for label in labels) / max(1, len(rows))
    return accuracy, "\n".join(lines)


async def run(args) -> dict:
    from serve_app.config import load_config
    from serve_app.governance.cost import CostModel, Price

    config = load_config(args.config)
    route = config.router.semantic_routes[args.alias]
    prompts = [(label, prompt) for label, items in yaml.safe_load(DATA.read_text()).items() for prompt in items]
    if args.limit:
        prompts = prompts[::max(1, len(prompts) // args.limit)][:args.limit]
    headers = {"authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    rows: list[dict] = []
    gate = asyncio.Semaphore(args.concurrency)

    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=120) as client:
        async def ask(model: str, prompt: str) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1})
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
            return response, elapsed

        async def one(index: int, label: str, prompt: str) -> None:
            async with gate:
                routed_first = index % 2 == 0
                if routed_first:
                    routed, routed_ms = await ask(args.alias, prompt)
                info = None if not routed_first else parse_route(routed.headers["x-spillway-route"])
                model = routed.headers["x-spillway-model"] if routed_first else route.targets[label].model
                direct, direct_ms = await ask(model, prompt)
                if not routed_first:
                    routed, routed_ms = await ask(args.alias, prompt)
                    info = parse_route(routed.headers["x-spillway-route"])
                rows.append({"expected": label, "route": info, "model": routed.headers["x-spillway-model"],
                             "site": routed.headers["x-spillway-site"], "routed_ms": routed_ms,
                             "direct_ms": direct_ms, "direct_model": model,
                             "prompt_tokens": routed.json()["usage"]["prompt_tokens"]})

        await one(0, *prompts[0])  # warm both paths before measuring
        rows.clear()
        started = time.monotonic()
        await asyncio.gather(*(one(i, label, prompt) for i, (label, prompt) in enumerate(prompts)))
        wall_s = time.monotonic() - started

    labels = list(route.targets)
    accuracy, table = confusion(rows, labels)
    # Latency: the routed request against the direct one (the same prompt, paired).
    step = [row["route"]["ms"] for row in rows if "ms" in row["route"]]
    routed = [row["routed_ms"] for row in rows]
    direct = [row["direct_ms"] for row in rows]
    added = [row["routed_ms"] - row["direct_ms"] for row in rows]
    # Cost: each request's prompt tokens and an assumed answer length.
    costs = CostModel(config)
    general = route.targets[route.default].model
    general_site = _home_site(config, general)

    def cost(price: Price, row: dict) -> float:
        return price.of(row["prompt_tokens"], args.output_tokens)

    routed_cost = sum(cost(costs.price(row["model"], row["site"]), row) for row in rows)
    baseline_cost = sum(cost(costs.price(general, general_site), row) for row in rows)
    api = Price(args.api_price[0] / 1e6, args.api_price[1] / 1e6)
    scenario_routed = sum(cost(api if row["route"]["target"] == route.default else
                               costs.price(row["model"], row["site"]), row) for row in rows)
    scenario_baseline = sum(cost(api, row) for row in rows)
    return {
        "prompts": len(rows), "wall_s": round(wall_s, 1), "accuracy": accuracy, "table": table,
        "reasons": dict(Counter(row["route"]["reason"] for row in rows)),
        "latency_ms": {
            "routing_step": {"p50": percentile(step, 50), "p99": percentile(step, 99)},
            "routed": {"p50": percentile(routed, 50), "p99": percentile(routed, 99)},
            "direct": {"p50": percentile(direct, 50), "p99": percentile(direct, 99)},
            "added": {"p50": percentile(added, 50), "p99": percentile(added, 99),
                      "mean": statistics.fmean(added)},
        },
        "cost": {"general_model": f"{general}@{general_site}", "output_tokens_assumed": args.output_tokens,
                 "configured": {"routed": routed_cost, "all_general": baseline_cost},
                 "api_scenario": {"price_per_million": args.api_price, "routed": scenario_routed,
                                  "all_general": scenario_baseline}},
    }


def _home_site(config, model_id: str) -> str:
    from serve_app.router.placement import site_order_key

    model = config.model(model_id)
    sites = sorted((config.site(s) for s in model.replicas if model.deploys_on(s)), key=site_order_key)
    return sites[0].name


def report(result: dict) -> str:
    lat, cost = result["latency_ms"], result["cost"]
    lines = [
        f"semantic routing: {result['prompts']} labelled prompts in {result['wall_s']} s "
        f"({platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})",
        "",
        result["table"],
        f"overall accuracy: {result['accuracy']['all']:.1%}   reasons: {result['reasons']}",
        "",
        "latency (ms)                 p50        p99",
        f"routing step (router-side) {lat['routing_step']['p50']:8.1f}   {lat['routing_step']['p99']:8.1f}",
        f"request via the alias      {lat['routed']['p50']:8.1f}   {lat['routed']['p99']:8.1f}",
        f"request to the model       {lat['direct']['p50']:8.1f}   {lat['direct']['p99']:8.1f}   (baseline, same run)",
        f"added by routing (paired)  {lat['added']['p50']:8.1f}   {lat['added']['p99']:8.1f}",
        "",
        f"cost of these requests ({cost['output_tokens_assumed']} output tokens assumed each)   routed   all to "
        f"{cost['general_model']}   saved",
    ]
    for name, figures in (("configured prices", cost["configured"]),
                          (f"general on an API at {cost['api_scenario']['price_per_million']} per M",
                           cost["api_scenario"])):
        saved = 1 - figures["routed"] / figures["all_general"] if figures["all_general"] else float("nan")
        lines.append(f"  {name:<48} {figures['routed']:10.4f}   {figures['all_general']:10.4f}   {saved:6.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--config", default=str(ROOT / "cluster_configs" / "local.yaml"),
                        help="the running cluster's config (routes and prices)")
    parser.add_argument("--alias", default="auto")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="use only this many prompts (spread over routes)")
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--api-price", type=lambda s: tuple(float(x) for x in s.split(",")), default=(2.5, 10.0),
                        help="managed-API scenario: input,output price per million tokens for the general model")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
