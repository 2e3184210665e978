"""``spillway`` command line: models, local cluster, deploy, status, cost, ingress settings for
`ray start`, the cloud-burst demo; keys, tenants, usage and
budgets through the admin API (``admin_cli.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve_app.config import DEFAULT_CONFIG_PATH, load_config
from serve_app.errors import ConfigError
from serve_app.ops import admin_cli


def _log(message: str) -> None:
    print(f"[spillway] {message}", flush=True)


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from deployments.model_prep import BUILTIN_MODELS, prepare_model, weights_digest

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    for name in args.only or sorted(BUILTIN_MODELS):
        _log(f"preparing model '{name}' ...")
        path = prepare_model(name, cache_dir, force=args.force)
        _log(f"  {path} (weights sha256 {weights_digest(path)[:16]})")
    return 0


def cmd_models_upload(args: argparse.Namespace) -> int:
    from deployments.sources import upload_model

    count = upload_model(Path(args.folder), args.uri)
    _log(f"uploaded {count} files to {args.uri} with a SHA256SUMS manifest (replicas verify every file)")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _log(f"config OK: {len(config.sites)} sites, {len(config.models)} models")
    if args.engine_args:
        from deployments.vllm_args import validate_engine_args

        for model in config.models:
            validate_engine_args(model)
        _log("engine arguments OK (checked against vLLM's parser)")
    return 0


def _prepare_builtin_models(config) -> None:
    from deployments.sources import BUILTIN_PREFIX, resolve_model_source

    for model in config.models:
        if model.source is not None and model.source.startswith(BUILTIN_PREFIX):
            name = model.source[len(BUILTIN_PREFIX):]
            _log(f"model '{model.id}': builtin '{name}' at {resolve_model_source(model.source, config.model_cache_dir)}")


def cmd_up(args: argparse.Namespace) -> int:
    from serve_app.ops.deploy import deploy
    from serve_app.ops.local_cluster import LocalCluster

    config = load_config(args.config)
    if not args.local:
        if not args.address:
            _log("give --local to start a cluster on this machine, or --address of a running Ray cluster")
            return 2
        deploy(config, args.address, log=_log)
    else:
        cluster = LocalCluster(config)
        _prepare_builtin_models(config)
        cluster.start(log=_log)
        deploy(config, cluster.address, log=_log)
    _print_usage(config)
    return 0


def _print_usage(config) -> None:
    base = f"http://{config.http.host}:{config.http.port}"
    model = config.models[0].id
    extra = ""
    embedder = next((m.id for m in config.models if m.engine.runner == "pooling"), None)
    if embedder is not None:
        extra += (f"\n  curl {base}/v1/embeddings -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{embedder}\", \"input\": [\"The cat sits on the mat.\"]}}'\n")
    for alias in config.router.semantic_routes:
        extra += (f"\n  curl {base}/v1/chat/completions -H 'content-type: application/json' -i "
                  f"-d '{{\"model\": \"{alias}\", \"messages\": [{{\"role\": \"user\", \"content\": "
                  f"\"Is this NDA clause enforceable?\"}}], \"max_tokens\": 8}}'   # see x-spillway-route\n")
    print(
        f"""
Spillway is serving on {base}/v1  (models: {', '.join(m.id for m in config.models)})

  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}' -i

  python -c "import openai; c = openai.OpenAI(base_url='{base}/v1', api_key='none'); \\
[print(x.choices[0].delta.content or '', end='') for x in c.chat.completions.create( \\
model='{model}', messages=[{{'role': 'user', 'content': 'Hello'}}], max_tokens=32, stream=True) if x.choices]"
{extra}

  spillway status    # sites, deployments, replicas
  spillway keys create --tenant TEAM    # API keys (then every request needs one)
  spillway usage --by tenant,model,site # requests, tokens, cost
  spillway down      # stop the local cluster
""",
        flush=True,
    )
    from serve_app.ops.deploy import wait_healthy

    auth = wait_healthy(config, log=_log).get("auth", {})
    if auth.get("mode") == "open":
        _log(f"WARNING: open mode: {auth.get('warning', 'no API keys exist')}")
    else:
        _log("API keys required (Authorization: Bearer <key>)")


def cmd_down(args: argparse.Namespace) -> int:
    from serve_app.ops.local_cluster import LocalCluster

    LocalCluster(load_config(args.config)).stop(log=_log)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from serve_app.ops.deploy import status
    from serve_app.ops.local_cluster import LocalCluster

    config = load_config(args.config)
    address = args.address or LocalCluster(config).address
    report = status(config, address)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"application {config.name}: {report['application']}")
    for site, nodes in report["sites"].items():
        print(f"site {site:10s} nodes={len(nodes)} " + " ".join(f"{n['node_id']}({n['cpus']:g} cpu)" for n in nodes))
    for site, info in report["external_sites"].items():
        print(f"site {site:10s} external {info['base_url']} models={','.join(info['models'])}")
    router = report["router"] or {}
    print(f"router     {router.get('status', 'NOT_DEPLOYED'):12s} replicas={router.get('replicas', {})}")
    for engine in report["engines"]:
        state = engine["state"]
        print(f"engine     {engine['model']:20s} site={engine['site']:8s} wanted={engine['wanted']} "
              f"{state['status']:12s} replicas={state['replicas']}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from serve_app.governance.cost import cost_report

    if args.utilisation is not None and not 0 < args.utilisation <= 1:
        print("spillway: --utilisation must be in (0, 1]", file=sys.stderr)
        return 2
    report = cost_report(load_config(args.config), args.utilisation)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("site         kind      basis           per accelerator-hour  planning utilisation")
    for s in report["sites"]:
        hourly = "-" if s["per_accelerator_hour"] is None else f"{s['per_accelerator_hour']:.4f}"
        share = "-" if s["planning_utilisation"] is None else f"{s['planning_utilisation']:.0%}"
        print(f"{s['site']:12s} {s['kind']:9s} {s['basis']:15s} {hourly:>20s}  {share:>20s}")
    print("\nmodel                site         utilisation  per 1M input  per 1M output")
    for m in report["models"]:
        share = "-" if m["utilisation"] is None else f"{m['utilisation']:.0%}"
        print(f"{m['model']:20s} {m['site']:12s} {share:>11s}  {m['per_million_input']:12.4f}  "
              f"{m['per_million_output']:13.4f}")
    if report["break_even"]:
        print()
    for b in report["break_even"]:
        share = b["utilisation"]
        verdict = ("never (even at 100 %)" if share > 1 else f"above {share:.1%} utilisation")
        print(f"{b['model']}: {b['owned_site']} is cheaper than {b['other_site']} {verdict}")
    return 0


def cmd_ingress_env(args: argparse.Namespace) -> int:
    """The Serve settings the config's ingress needs on every node, as KEY=VALUE lines: `ray start`
    commands in cluster_configs/ray/ and cluster_configs/onprem/join.sh run `env $(spillway ingress-env ...)`."""
    config = load_config(args.config)
    for key, value in sorted(config.http.ingress_env(config.router.replicas).items()):
        print(f"{key}={value}")
    return 0


def cmd_demo_cloud_burst(args: argparse.Namespace) -> int:
    from serve_app.ops import cloud_burst

    return cloud_burst.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillway", description="Spillway: hybrid on-prem/cloud LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="Spillway YAML config")
        return p

    models = sub.add_parser("models", help="manage the built-in generated models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="write the built-in models (deterministic, seeded)")
    prepare.add_argument("--cache-dir", help="target folder (default ~/.cache/spillway/models)")
    prepare.add_argument("--only", action="append", help="prepare only this model (dense, moe); repeatable")
    prepare.add_argument("--force", action="store_true", help="rewrite even if an identical model is there")
    prepare.set_defaults(func=cmd_models_prepare)
    upload = models_sub.add_parser("upload", help="upload a model folder to s3://bucket/prefix with checksums")
    upload.add_argument("folder")
    upload.add_argument("uri", help="s3://bucket/prefix (boto3's credentials; AWS_ENDPOINT_URL for S3-compatible stores)")
    upload.set_defaults(func=cmd_models_upload)

    config = sub.add_parser("config", help="check a config file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a config (strict: unknown keys fail)")
    check.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG_PATH))
    check.add_argument("--engine-args", action="store_true", help="also check engine args against vLLM")
    check.set_defaults(func=cmd_config_check)

    up = with_config(sub.add_parser("up", help="start (or deploy onto) a cluster and serve the config"))
    up.add_argument("--local", action="store_true", help="start a two-site Ray cluster on this machine")
    up.add_argument("--address", help="address of a running Ray cluster (instead of --local)")
    up.set_defaults(func=cmd_up)

    down = with_config(sub.add_parser("down", help="stop the local cluster"))
    down.set_defaults(func=cmd_down)

    stat = with_config(sub.add_parser("status", help="sites, deployments and replicas"))
    stat.add_argument("--address", help="Ray address (default: the local cluster's)")
    stat.add_argument("--json", action="store_true")
    stat.set_defaults(func=cmd_status)

    cost = with_config(sub.add_parser("cost", help="the cost model: price per site, per million tokens, break-even"))
    cost.add_argument("--utilisation", type=float, help="utilisation of owned (amortised) sites, 0-1 "
                      "(default: each site's planning utilisation)")
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=cmd_cost)
    ingress = with_config(sub.add_parser("ingress-env", help="the ingress settings every node's `ray start` needs"))
    ingress.set_defaults(func=cmd_ingress_env)

    demo = sub.add_parser("demo", help="demonstrations on this machine")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    burst = demo_sub.add_parser("cloud-burst", add_help=False,
                                help="cloud capacity from zero with Ray's fake multi-node provider (--help for options)")
    burst.add_argument("rest", nargs=argparse.REMAINDER)
    burst.set_defaults(func=cmd_demo_cloud_burst)
    admin_cli.add_parsers(sub, with_config)
    from serve_app.planner import cli as planner_cli

    planner_cli.add_parsers(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"spillway: {exc}", file=sys.stderr)
        return 2
    except admin_cli.AdminError as exc:
        print(f"spillway: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
