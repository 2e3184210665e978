"""Build the Ray Serve application from a Spillway config.

``build_app(config)`` returns the application: one engine deployment per
(model, site) with at least one replica or autoscaling (0..N, ``ops/autoscale.py``), each pinned to its site by the site's
custom resource on *every* placement-group bundle, behind one Router
deployment (the ingress), which runs on a trusted (on-prem) site because it
sees every prompt, beside the governance ledger (one replica: keys, limits,
budgets, usage).

``app_builder(args)`` is the entry point for ``serve deploy`` / ``serve run``:
``import_path: serve_app.app:app_builder`` with ``args: {config: <path>}``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.vllm_args import validate_engine_args
from deployments.replica import EngineReplica, engine_env
from serve_app.config import DEFAULT_CONFIG_PATH, ModelConfig, SiteConfig, SiteKind, SpillwayConfig, load_config
from serve_app.governance.service import LedgerDeployment
from serve_app.ingress import Router, router_grace_s
from serve_app.ops.autoscale import cloud_autoscaling
from serve_app.ops.operator import OperatorDeployment

# A sliver of the site resource: enough to pin a bundle to the site's nodes without
# limiting how many replicas fit there (nodes declare e.g. site:onprem=1000).
SITE_RESOURCE_PER_BUNDLE = 0.001
# Serve runs a replica's user code on its own thread and event loop by default, so every message
# (every streamed chunk, every handle call) crosses threads. Spillway's router and engines never
# block their loop, so they run on the replica's main loop (benchmarks/NOTES.md has the effect).
# Serve also writes every log line (an access line per request) both to the replica's file under
# logs/serve/ and to stderr, which Ray's log monitor tails and republishes to drivers: the files
# stay, the copy goes (as Serve's own RAY_SERVE_THROUGHPUT_OPTIMIZED mode does).
LEAN_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                    "RAY_SERVE_LOG_TO_STDERR": "0"}
ENGINE_HEALTH_CHECK_PERIOD_S = 5.0
ENGINE_HEALTH_CHECK_TIMEOUT_S = 30.0
LEDGER_MAX_ONGOING_REQUESTS = 100_000  # every router's admission calls; each is answered from memory
PROJECT_ROOT = DEFAULT_CONFIG_PATH.parent.parent


def deployment_name(model_id: str, site: str) -> str:
    """Serve deployment names allow no '/', and hub ids have one."""
    return f"engine-{re.sub(r'[^A-Za-z0-9_.-]+', '_', model_id)}-{site}"


def placement_bundles(model: ModelConfig, site: SiteConfig) -> list[dict[str, float]]:
    """Placement-group bundles for one engine replica.

    The first bundle holds the replica actor (its CPUs); with GPUs, each
    tensor/pipeline-parallel worker gets its own bundle. Every bundle carries
    the site resource, so no worker can land on another site.
    """
    first: dict[str, float] = {"CPU": model.resources.num_cpus, site.resource: SITE_RESOURCE_PER_BUNDLE}
    if model.resources.memory_gib:
        first["memory"] = model.resources.memory_gib * 1024**3
    bundles = [first]
    if model.resources.num_gpus > 0:
        worker = {"GPU": model.resources.num_gpus, site.resource: SITE_RESOURCE_PER_BUNDLE}
        bundles += [dict(worker) for _ in range(model.engine.workers_per_replica)]
    return bundles


def placement_strategy(model: ModelConfig, bundles: list[dict[str, float]]) -> str:
    """One node for a replica (tensor parallelism needs its GPUs' fast links), unless pipeline
    parallelism splits it into stages, which may then span nodes. Either way every bundle carries
    the site resource, so a replica never spans sites."""
    if model.engine.pipeline_parallel_size > 1:
        return "PACK"
    return "STRICT_PACK" if len(bundles) > 1 else "PACK"


def engine_deployment(config: SpillwayConfig, model: ModelConfig, site: SiteConfig, replicas: int) -> Application:
    bundles = placement_bundles(model, site)
    actor_options: dict[str, Any] = {
        "num_cpus": model.resources.num_cpus,
        "resources": {site.resource: SITE_RESOURCE_PER_BUNDLE},
        "runtime_env": {"env_vars": {**LEAN_REPLICA_ENV, **engine_env(model, site, config.tracing)}},
    }
    if model.resources.memory_gib:
        actor_options["memory"] = model.resources.memory_gib * 1024**3
    scaling = model.autoscaling.get(site.name)
    # An autoscaled site's replica count is the cloud scaler's (ops/autoscale.py): Serve's
    # autoscaler runs a policy that follows it, between the site's bounds, from `replicas` at deploy.
    count = {"num_replicas": replicas} if scaling is None else {"autoscaling_config": cloud_autoscaling(scaling, replicas)}
    deployment = serve.deployment(EngineReplica).options(
        name=deployment_name(model.id, site.name),
        **count,
        ray_actor_options=actor_options,
        placement_group_bundles=bundles,
        placement_group_strategy=placement_strategy(model, bundles),
        # The engine's slots: Serve never sends a replica more than it can run at once;
        # the rest waits in the router.
        max_ongoing_requests=model.engine.max_num_seqs,
        health_check_period_s=ENGINE_HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=ENGINE_HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
        # Rolling updates start replacements before old replicas stop (full capacity throughout).
        max_surge_percent=model.rollout_surge_percent,
        graceful_shutdown_wait_loop_s=1.0,
    )
    args = (model.model_dump(mode="json"), site.model_dump(mode="json"), config.model_cache_dir,
            config.tracing.model_dump(mode="json"), config.engine_port.model_dump(mode="json"))
    return versioned(deployment, args).bind(*args)


def build_app(config: SpillwayConfig) -> Application:
    """The Serve application for ``config``: engines per (model, site) behind the Router."""
    engines: dict[str, dict[str, Application]] = {}
    for model in config.models:
        sites = [name for name in model.replicas
                 if model.deploys_on(name) and config.site(name).kind != SiteKind.external]
        if sites:
            validate_engine_args(model)
        for site_name in sites:  # (an external site has no deployment: the routers call its API)
            engines.setdefault(model.id, {})[site_name] = engine_deployment(
                config, model, config.site(site_name), model.replicas[site_name]
            )
    router_site = config.router_site
    # One ledger per cluster (limits and budgets hold for the sum over router replicas), on the
    # router's site: it holds tenants' keys and spend.
    control_plane = config.control_plane_dump()
    ledger = serve.deployment(LedgerDeployment).options(
        name="ledger",
        num_replicas=1,
        max_ongoing_requests=LEDGER_MAX_ONGOING_REQUESTS,
        ray_actor_options={
            "num_cpus": 0,
            "resources": {router_site.resource: SITE_RESOURCE_PER_BUNDLE},
            "runtime_env": {"env_vars": dict(LEAN_REPLICA_ENV)},
        },
    )
    ledger = versioned(ledger, control_plane).bind(control_plane)
    # The operator (one replica, beside the ledger): the cloud scaler and progressive rollouts.
    operator = serve.deployment(OperatorDeployment).options(
        name="operator",
        num_replicas=1,
        ray_actor_options={
            "num_cpus": 0,
            "resources": {router_site.resource: SITE_RESOURCE_PER_BUNDLE},
            "runtime_env": {"env_vars": dict(LEAN_REPLICA_ENV)},
        },
    )
    operator = versioned(operator, control_plane).bind(control_plane)
    router = serve.deployment(Router).options(
        name="router",
        num_replicas=config.router.replicas,
        max_ongoing_requests=config.router.max_ongoing_requests,
        graceful_shutdown_timeout_s=router_grace_s(config),
        graceful_shutdown_wait_loop_s=1.0,
        logging_config={"enable_access_log": config.router.serve_access_log},
        ray_actor_options={
            "num_cpus": config.router.num_cpus,
            "resources": {router_site.resource: SITE_RESOURCE_PER_BUNDLE},
            "runtime_env": {"env_vars": dict(LEAN_REPLICA_ENV)},
        },
    )
    engine_names = {m: sorted(by_site) for m, by_site in engines.items()}
    return versioned(router, (control_plane, engine_names)).bind(control_plane, engines, ledger, operator)


def versioned(deployment, init_args) -> Any:
    """The deployment with a version that changes exactly when a restart is needed: its class, its
    arguments, its actor options (resources, environment) and its placement. Without one, Serve
    gives every ``serve.run`` a new random version and replaces every replica of the app; with it,
    a new model version rolls only that model's engines (other options, such as replica counts,
    apply without a restart)."""
    config = deployment._replica_config
    digest = hashlib.sha256(json.dumps(
        [deployment.func_or_class.__qualname__, init_args, config.ray_actor_options,
         config.placement_group_bundles, config.placement_group_strategy], sort_keys=True, default=str,
    ).encode()).hexdigest()[:16]
    return deployment.options(version=digest, _internal=True)


def app_builder(args: dict[str, Any]) -> Application:
    """``serve deploy`` entry point. ``args.config`` is a path to a Spillway YAML."""
    config_path = Path(args.get("config") or DEFAULT_CONFIG_PATH)
    if not config_path.is_absolute() and not config_path.exists():
        config_path = PROJECT_ROOT / config_path
    return build_app(load_config(config_path))
