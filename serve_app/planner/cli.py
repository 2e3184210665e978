"""``spillway plan simulate``: one fleet (the cluster's config plus engine profiles), one synthetic
trace, the figures the planner answers with."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from serve_app.config import load_config
from serve_app.config.base import Strict
from serve_app.errors import ConfigError
from serve_app.planner.profile import EngineProfile


class ProfileSet(Strict):
    profiles: dict[str, EngineProfile] = Field(description="Profiles by name (each names its source).")
    use: dict[str, dict[str, str]] = Field(description="Model id -> site -> profile name.")


def load_profiles(path: str | Path) -> dict[tuple[str, str], EngineProfile]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
        for name, profile in raw.get("profiles", {}).items():
            profile.setdefault("name", name)
        spec = ProfileSet.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as exc:
        raise ConfigError(f"profiles {path}: {exc}") from None
    table = {}
    for model, sites in spec.use.items():
        for site, name in sites.items():
            if name not in spec.profiles:
                raise ConfigError(f"profiles {path}: {model}@{site} uses unknown profile {name!r}")
            table[(model, site)] = spec.profiles[name]
    return table


def cmd_plan_simulate(args: argparse.Namespace) -> int:
    import time

    from serve_app.planner.sim import Simulation

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    missing = [f"{m.id}@{site}" for m in config.models for site in m.replicas
               if m.id == args.model and m.deploys_on(site) and (m.id, site) not in profiles]
    if missing:
        raise ConfigError(f"no profile for {', '.join(missing)} in {args.profiles}")
    requests = _trace(args)
    simulation = Simulation(config, profiles, args.provisioning_delay_s)
    started = time.perf_counter()
    result = simulation.run(requests)
    wall_s = time.perf_counter() - started
    summary = {**result.summary(simulation.onprem_sites), "requests": len(requests),
               "simulated_s": args.duration_s, "wall_s": round(wall_s, 2),
               "requests_per_wall_s": round(len(requests) / wall_s) if wall_s else None}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:22s} {value}")
    return 0


def _trace(args: argparse.Namespace):
    from serve_app.planner.traffic import poisson

    bursts = [tuple(float(x) for x in burst.split(",")) for burst in args.burst]
    return poisson(args.model, args.rate, args.duration_s, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens, confidential_share=args.confidential_share, seed=args.seed,
                   bursts=bursts)


def _counts(text: str) -> range:
    low, _, high = text.partition("-")
    return range(int(low), int(high or low) + 1)


def cmd_plan_size(args: argparse.Namespace) -> int:
    from serve_app.planner.size import cheapest, plot, size

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    candidates = size(config, profiles, _trace(args), args.model, args.p99_ms, args.onprem_site,
                      _counts(args.onprem), args.cloud_site or None, _counts(args.cloud), args.provisioning_delay_s)
    best = cheapest(candidates)
    if args.png:
        plot(candidates, args.p99_ms, args.png)
    if args.json:
        print(json.dumps({"cheapest": best.__dict__ if best else None,
                          "candidates": [c.__dict__ for c in candidates]}, indent=2))
        return 0 if best else 1
    print("on-prem  cloud  p50 TTFT ms  p99 TTFT ms  spill share  rejected  cost/hour  meets")
    for c in candidates:
        print(f"{c.onprem:7d} {c.cloud:6d} {c.ttft_p50_ms!s:>12} {c.ttft_p99_ms!s:>12} {c.spill_share!s:>12} "
              f"{c.rejected:9d} {c.cost_per_hour:10.4f}  {'yes' if c.meets else 'no'}")
    if best is None:
        print(f"no fleet in the ranges meets p99 TTFT <= {args.p99_ms:g} ms")
        return 1
    print(f"cheapest: {best.onprem} on-prem + {best.cloud} cloud replicas, {best.cost_per_hour:.4f} per hour, "
          f"p99 TTFT {best.ttft_p99_ms} ms" + (f"; cost curve: {args.png}" if args.png else ""))
    return 0


def _traffic_arguments(parser) -> None:
    parser.add_argument("--profiles", default=str(Path(__file__).resolve().parents[2] / "cluster_configs" /
                                                  "profiles" / "local-cpu.yaml"), help="engine profiles YAML")
    parser.add_argument("--model", default="spillway-dense")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--burst", action="append", default=[], metavar="START,LENGTH,EXTRA_RATE",
                        help="extra arrivals per second from START for LENGTH seconds (repeatable)")
    parser.add_argument("--prompt-tokens", default="lognormal:256,0.6", help="a loadtests distribution")
    parser.add_argument("--max-tokens", default="64", help="a loadtests distribution")
    parser.add_argument("--confidential-share", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--provisioning-delay-s", type=float, default=60.0,
                        help="an autoscaled cloud replica serves this long after it is asked for (node + engine start)")
    parser.add_argument("--json", action="store_true")


def add_parsers(sub, with_config) -> None:
    plan = sub.add_parser("plan", help="capacity planning: the router's policies over a simulated fleet")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    simulate = with_config(plan_sub.add_parser("simulate", help="p50/p99 TTFT, on-prem and spill share, budget "
                                                                 "misses, residency violations, cost per hour"))
    _traffic_arguments(simulate)
    simulate.set_defaults(func=cmd_plan_simulate)
    sizing = with_config(plan_sub.add_parser("size", help="the cheapest fleet (on-prem and cloud replicas of one "
                                                          "model) that meets a p99 TTFT target, and its cost curve"))
    _traffic_arguments(sizing)
    sizing.add_argument("--p99-ms", type=float, required=True, help="p99 TTFT target (ms)")
    sizing.add_argument("--onprem-site", default="onprem")
    sizing.add_argument("--onprem", default="1-4", help="on-prem replica counts to try, e.g. 1-8")
    sizing.add_argument("--cloud-site", default="cloud", help="'' for none")
    sizing.add_argument("--cloud", default="0-2", help="cloud replica counts to try, e.g. 0-4")
    sizing.add_argument("--png", help="write the cost curve (cost per hour against p99 TTFT) here")
    sizing.set_defaults(func=cmd_plan_size)
