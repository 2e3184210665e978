"""``spillway plan simulate``: one fleet (the cluster's config plus engine profiles), one synthetic
trace, the figures the planner answers with."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from serve_app.config import SiteKind, load_config
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
    from serve_app.planner.sim import Simulation

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    requests, notes = _trace(args)
    check_fleet(config, profiles, {r.model for r in requests}, args.profiles)
    simulation = Simulation(config, profiles, args.provisioning_delay_s)
    started = time.perf_counter()
    result = simulation.run(requests)
    wall_s = time.perf_counter() - started
    summary = {**result.summary(simulation.onprem_sites), **ttft_by_class(result, requests),
               "requests": len(requests), **notes,
               "simulated_s": round(result.duration_s, 1), "wall_s": round(wall_s, 2),
               "requests_per_wall_s": round(len(requests) / wall_s) if wall_s else None}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        print(f"{key:22s} {value}")
    return 0


def ttft_by_class(result, requests) -> dict:
    """p99 TTFT per data class, where the traffic has more than one (pinned requests wait for
    on-prem alone: their tail is not the others')."""
    by_class: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        by_class.setdefault(request.data_class.name, []).append(index)
    if len(by_class) < 2:
        return {}
    p99 = {name: result.percentile(99, indices) for name, indices in sorted(by_class.items())}
    return {f"ttft_p99_ms_{name}": None if value is None else round(value, 1) for name, value in p99.items()}


def check_fleet(config, profiles: dict, models: set[str], profiles_path) -> None:
    """Every model the traffic asks for is in the config, with a profile for each site it runs on."""
    known = {m.id for m in config.models}
    unknown = sorted(models - known)
    if unknown:
        raise ConfigError(f"the traffic asks for {', '.join(unknown)}, not a model of the config "
                          f"(models: {', '.join(sorted(known))}; rename with --trace-model OLD=NEW)")
    missing = [f"{m.id}@{site}" for m in config.models if m.id in models for site in m.replicas
               if m.deploys_on(site) and config.site(site).kind != SiteKind.external and (m.id, site) not in profiles]
    if missing:
        raise ConfigError(f"no profile for {', '.join(missing)} in {profiles_path}")


def _load_trace(args: argparse.Namespace):
    """``--trace`` replayed (with ``--trace-model`` renames); a trace with nothing to replay is an error."""
    from serve_app.planner.traffic import replay

    try:
        trace = replay(args.trace, models=dict(pair.split("=", 1) for pair in args.trace_model))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"trace {args.trace}: {exc}") from None
    if not trace.requests:
        raise ConfigError(f"trace {args.trace}: no request to replay (left out: {dict(trace.skipped)})")
    return trace


def _trace(args: argparse.Namespace) -> tuple[list, dict]:
    """The requests (Poisson, or ``--trace`` replayed) and what the summary says about them."""
    from serve_app.planner.traffic import poisson

    if args.trace:
        trace = _load_trace(args)
        return trace.requests, {"trace_skipped": dict(trace.skipped),
                                "trace_prompt_tokens_estimated": trace.prompt_tokens_estimated}
    bursts = [tuple(float(x) for x in burst.split(",")) for burst in args.burst]
    return poisson(args.model, args.rate, args.duration_s, prompt_tokens=args.prompt_tokens,
                   max_tokens=args.max_tokens, confidential_share=args.confidential_share, seed=args.seed,
                   bursts=bursts), {}


def _counts(text: str) -> range:
    low, _, high = text.partition("-")
    return range(int(low), int(high or low) + 1)


def cmd_plan_size(args: argparse.Namespace) -> int:
    from serve_app.planner.size import cheapest, plot, size

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    requests, _ = _trace(args)
    check_fleet(config, profiles, {r.model for r in requests}, args.profiles)
    candidates = size(config, profiles, requests, args.model, args.p99_ms, args.onprem_site,
                      _counts(args.onprem), args.cloud_site or None, _counts(args.cloud), args.provisioning_delay_s,
                      workers=args.workers or os.cpu_count() or 1)
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


def cmd_plan_profile(args: argparse.Namespace) -> int:
    """Measure one model's profile on a running Spillway (or fit it to a recorded run) and write it as YAML."""
    import asyncio
    import os
    import platform

    from serve_app.planner.measure import measure

    config = load_config(args.config)
    model = next((m for m in config.models if m.id == args.model), None)
    if model is None or not model.deploys_on(args.site):
        raise ConfigError(f"the config has no model {args.model!r} on site {args.site!r}")
    if args.from_trace:
        name = args.name or f"fitted-{args.model}"
        profile = _fitted(args, config, model, name)
    else:
        print(f"measuring {args.model} on {args.site} through {args.host} ...")
        measured = asyncio.run(measure(args.host, args.model, args.site, model.engine.max_num_seqs,
                                       api_key=args.api_key or os.environ.get("SPILLWAY_API_KEY"),
                                       max_tokens=args.max_tokens, rounds=args.rounds))
        name = args.name or f"measured-{args.model}"
        source = (f"spillway plan profile --model {args.model} --site {args.site} on {platform.node()} "
                  f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d %H:%M')}, through the router")
        profile = measured.profile(name, model.engine.max_num_seqs, source)
    sites = [site for site in model.replicas if model.deploys_on(site) and config.site(site).kind != SiteKind.external]
    document = {"profiles": {name: profile.model_dump(mode="json", exclude={"name"})},
                "use": {args.model: {site: name for site in sites}}}
    text = yaml.safe_dump(document, sort_keys=False)
    if args.out:
        Path(args.out).write_text(f"# From `{profile.source}`; every site of the model uses it.\n" + text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _fitted(args: argparse.Namespace, config, model, name: str) -> EngineProfile:
    """``--from-trace``: the profile the recorded run's engines showed (``planner/fit.py``)."""
    from serve_app.planner.fit import fit

    base = load_profiles(args.base).get((model.id, args.site))
    if base is None:
        raise ConfigError(f"profiles {args.base}: no profile for {model.id}@{args.site} (its prefill speed is used)")
    trace = _load_trace(argparse.Namespace(trace=args.from_trace, trace_model=[]))
    source = (f"spillway plan profile --from-trace {args.from_trace}: {model.id} on {args.site} as that run "
              f"served it; prefill speed from {base.name}")
    try:
        return fit(trace.records, model.id, args.site, model.replicas[args.site], model.engine.max_num_seqs, base,
                   name, source)
    except ValueError as exc:
        raise ConfigError(f"trace {args.from_trace}: {exc}") from None


def cmd_plan_accuracy(args: argparse.Namespace) -> int:
    """A recorded run replayed through the simulator, figures side by side with what it measured."""
    from serve_app.planner.accuracy import compare, measured_figures, table
    from serve_app.planner.sim import Simulation

    config = load_config(args.config)
    profiles = load_profiles(args.profiles)
    trace = _load_trace(args)
    check_fleet(config, profiles, {r.model for r in trace.requests}, args.profiles)
    simulation = Simulation(config, profiles, args.provisioning_delay_s)
    result = simulation.run(trace.requests)
    rows = compare(trace, result, simulation.onprem_sites)
    measured = measured_figures(trace, simulation.onprem_sites)
    if args.json:
        print(json.dumps({"rows": [{"metric": r.metric, "measured": r.measured, "simulated": r.simulated,
                                    "error": r.error} for r in rows],
                          "requests": len(trace.requests), "ttft_samples": measured["ttft_samples"],
                          "live_ttft_samples": measured["live_ttft_samples"],
                          "skipped": dict(trace.skipped), "rejected_in_simulation": dict(result.rejected)}, indent=2))
        return 0
    print(f"{len(trace.requests)} requests replayed ({measured['ttft_samples']} with a measured TTFT, "
          f"{measured['live_ttft_samples']} of them read as they came; "
          f"left out: {dict(trace.skipped) or 'none'}); profiles: {args.profiles}")
    print(table(rows))
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
    parser.add_argument("--trace", help="replay a load test's requests.jsonl (or its report folder) instead of "
                                        "Poisson traffic: arrivals, lengths and data classes as recorded")
    parser.add_argument("--trace-model", action="append", default=[], metavar="OLD=NEW",
                        help="serve the trace's model OLD as the config's model NEW (repeatable)")
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
    sizing.add_argument("--workers", type=int, default=0,
                        help="processes simulating candidate fleets side by side (default: one per core); the "
                             "answer is the same for any number")
    sizing.set_defaults(func=cmd_plan_size)
    profile = with_config(plan_sub.add_parser("profile", help="measure a model's engine profile on a running "
                                                              "Spillway (through the router) and write it as YAML"))
    profile.add_argument("--host", default="http://127.0.0.1:8000")
    profile.add_argument("--model", default="spillway-dense")
    profile.add_argument("--site", default="onprem", help="only streams served here count")
    profile.add_argument("--max-tokens", type=int, default=64, help="tokens per stream when timing a batch")
    profile.add_argument("--rounds", type=int, default=3)
    profile.add_argument("--api-key", help="default: $SPILLWAY_API_KEY (once the cluster has keys)")
    profile.add_argument("--from-trace", help="fit the profile to a recorded load test (its requests.jsonl or report "
                                              "folder) instead of measuring: the engines as that run's load found "
                                              "them")
    profile.add_argument("--base", default=str(Path(__file__).resolve().parents[2] / "cluster_configs" / "profiles" /
                                               "local-cpu.yaml"),
                         help="with --from-trace: profiles YAML whose profile of the model gives the prefill speed")
    profile.add_argument("--name", help="the profile's name (default measured-<model>, fitted-<model>)")
    profile.add_argument("--out", help="write the profiles YAML here (default: print it)")
    profile.set_defaults(func=cmd_plan_profile)
    accuracy = with_config(plan_sub.add_parser("accuracy", help="replay a load test's requests.jsonl in the "
                                                                "simulator and compare with what it measured"))
    accuracy.add_argument("--trace", required=True, help="the run's requests.jsonl, or its report folder")
    accuracy.add_argument("--trace-model", action="append", default=[], metavar="OLD=NEW")
    accuracy.add_argument("--profiles", required=True, help="engine profiles YAML (e.g. from `plan profile`)")
    accuracy.add_argument("--provisioning-delay-s", type=float, default=60.0)
    accuracy.add_argument("--json", action="store_true")
    accuracy.set_defaults(func=cmd_plan_accuracy)
