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
    from serve_app.planner.traffic import poisson

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    missing = [f"{m.id}@{site}" for m in config.models for site in m.replicas
               if m.id == args.model and m.deploys_on(site) and (m.id, site) not in profiles]
    if missing:
        raise ConfigError(f"no profile for {', '.join(missing)} in {args.profiles}")
    bursts = [tuple(float(x) for x in burst.split(",")) for burst in args.burst]
    requests = poisson(args.model, args.rate, args.duration_s, prompt_tokens=args.prompt_tokens,
                       max_tokens=args.max_tokens, confidential_share=args.confidential_share, seed=args.seed,
                       bursts=bursts)
    simulation = Simulation(config, profiles)
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


def add_parsers(sub, with_config) -> None:
    plan = sub.add_parser("plan", help="capacity planning: the router's policies over a simulated fleet")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    simulate = with_config(plan_sub.add_parser("simulate", help="p50/p99 TTFT, on-prem and spill share, budget "
                                                                 "misses, residency violations, cost per hour"))
    simulate.add_argument("--profiles", default=str(Path(__file__).resolve().parents[2] / "cluster_configs" /
                                                    "profiles" / "local-cpu.yaml"), help="engine profiles YAML")
    simulate.add_argument("--model", default="spillway-dense")
    simulate.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    simulate.add_argument("--duration-s", type=float, default=600.0)
    simulate.add_argument("--burst", action="append", default=[], metavar="START,LENGTH,EXTRA_RATE",
                          help="extra arrivals per second from START for LENGTH seconds (repeatable)")
    simulate.add_argument("--prompt-tokens", default="lognormal:256,0.6", help="a loadtests distribution")
    simulate.add_argument("--max-tokens", default="64", help="a loadtests distribution")
    simulate.add_argument("--confidential-share", type=float, default=0.0)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--json", action="store_true")
    simulate.set_defaults(func=cmd_plan_simulate)
