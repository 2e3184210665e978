"""Spillway's one configuration model (``serve_app.config``).

The same YAML drives ``spillway up --local``, ``serve deploy`` (through
``serve_app.app:app_builder``) and the tests. Every model is strict
(``extra="forbid"``): a misspelt key fails at load, before any GPU is paid for.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, model_validator

from serve_app.config.base import DataClassName, Strict
from serve_app.config.cost import HOURLY_BASES
from serve_app.config.governance import GovernanceConfig, StoreConfig, StoreKind
from serve_app.config.infra import (
    FRAME_OVERHEAD_BYTES,
    RAY_WORKER_PORTS,
    EnginePortConfig,
    HttpConfig,
    IngressKind,
    LocalClusterConfig,
    LocalNodeConfig,
    TracingConfig,
    TracingExporter,
)
from serve_app.config.models import AutoscalingConfig, EngineConfig, ModelConfig, QueueConfig, ReplicaResources, SplitConfig
from serve_app.config.router import RouterConfig
from serve_app.config.sites import SiteConfig, SiteKind
from serve_app.errors import ConfigError


class SpillwayConfig(Strict):
    name: str = Field(default="spillway", description="Serve application name.")
    sites: list[SiteConfig]
    models: list[ModelConfig]
    router: RouterConfig = Field(default_factory=RouterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    engine_port: EnginePortConfig = Field(default_factory=EnginePortConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    local_cluster: LocalClusterConfig | None = Field(
        default=None, description="Nodes for `spillway up --local`; ignored on a real cluster."
    )
    model_cache_dir: str | None = Field(
        default=None, description="Where builtin models are written (default ~/.cache/spillway/models)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> "SpillwayConfig":
        site_names = [s.name for s in self.sites]
        if len(set(site_names)) != len(site_names):
            raise ValueError(f"site names must be unique, got {site_names}")
        if not self.sites:
            raise ValueError("at least one site is required")
        model_ids = [m.id for m in self.models]
        if len(set(model_ids)) != len(model_ids):
            raise ValueError(f"model ids must be unique, got {model_ids}")
        if not self.models:
            raise ValueError("at least one model is required")
        for model in self.models:
            unknown = set(model.replicas) - set(site_names)
            if unknown:
                raise ValueError(f"model {model.id!r} names unknown site(s) {sorted(unknown)}; known: {site_names}")
            unknown = set(model.site_throughput) - set(site_names)
            if unknown:
                raise ValueError(f"model {model.id!r}: site_throughput names unknown site(s) {sorted(unknown)}")
            for site_name in model.replicas:
                cost = self.site(site_name).cost
                if cost is not None and cost.basis in HOURLY_BASES and model.throughput_on(site_name) is None:
                    raise ValueError(f"model {model.id!r}: site {site_name!r} is priced per hour ({cost.basis}); "
                                     "give models[].throughput (tokens/s per replica) to price its tokens")
            for site_name, scaling in model.autoscaling.items():
                if site_name not in model.replicas:
                    raise ValueError(f"model {model.id!r}: autoscaling names site {site_name!r}, which is not "
                                     "under its replicas")
                if self.site(site_name).kind != SiteKind.cloud:
                    raise ValueError(f"model {model.id!r}: only cloud sites autoscale; {site_name!r} is "
                                     f"{self.site(site_name).kind.value} (its replicas stay fixed)")
                if not scaling.min_replicas <= model.replicas[site_name] <= scaling.max_replicas:
                    raise ValueError(f"model {model.id!r}: replicas[{site_name!r}] ({model.replicas[site_name]}) "
                                     f"must lie between min_replicas and max_replicas of its autoscaling")
            kinds = {self.site(name).kind for name, count in model.replicas.items() if model.deploys_on(name)}
            if kinds - {SiteKind.external} and model.source is None:
                raise ValueError(f"model {model.id!r} runs engines of its own: it needs a `source`")
            for site_name in model.replicas:
                external = self.site(site_name).external
                if external is not None and model.replicas[site_name] > 1:
                    raise ValueError(f"model {model.id!r}: replicas[{site_name!r}] on an external site is 0 or 1 "
                                     "(its slots are the site's max_concurrency)")
            if sum(model.replicas.values()) == 0 and not model.autoscaling:
                raise ValueError(f"model {model.id!r} has no replica on any site")
        if self.autoscaled and not self.router.direct_dispatch:
            raise ValueError("autoscaling needs router.direct_dispatch: routers count a group's replicas "
                             "from the engine ports they discover")
        if self.router.site is not None and self.router.site not in site_names:
            raise ValueError(f"router.site {self.router.site!r} is not a configured site")
        if self.router_site.kind == SiteKind.external:
            raise ValueError("the router needs a site of its own (onprem or cloud); external sites run no Ray nodes")
        for site in self.sites:
            if site.external is not None:
                unknown = set(site.external.models) - set(model_ids)
                if unknown:
                    raise ValueError(f"site {site.name!r}: external.models names unknown model(s) {sorted(unknown)}")
        _check_policy_names(self.router)
        for alias, split in self.router.splits.items():
            if alias in model_ids:
                raise ValueError(f"split alias {alias!r} is also a model id")
            unknown = set(split.variants) - set(model_ids)
            if unknown:
                raise ValueError(f"split {alias!r} names unknown model(s) {sorted(unknown)}")
        _check_semantic_routes(self)
        if self.engine_port.max_frame_bytes < self.router.max_body_bytes + FRAME_OVERHEAD_BYTES:
            raise ValueError(f"engine_port.max_frame_bytes must be at least router.max_body_bytes + "
                             f"{FRAME_OVERHEAD_BYTES} (a request frame carries the body)")
        fixed = {"http.port": self.http.port, **self.http.extra_ports(self.router.replicas)}
        if self.local_cluster is not None:
            cluster = self.local_cluster
            fixed.update({"local_cluster.ray_port": cluster.ray_port,
                          "local_cluster.dashboard_port": cluster.dashboard_port})
            fixed.update({f"local_cluster.metrics_export_port (node {i})": cluster.metrics_export_port + i
                          for i in range(len(cluster.nodes))})
        for name, port in fixed.items():
            if port in RAY_WORKER_PORTS:
                raise ValueError(f"{name} {port} is inside Ray's worker port range 10002-19999; pick another")
        if len(set(fixed.values())) != len(fixed):
            raise ValueError(f"ports must differ: {fixed}")
        if self.local_cluster is not None:
            for node in self.local_cluster.nodes:
                if node.site not in site_names:
                    raise ValueError(f"local_cluster node names unknown site {node.site!r}")
                if self.site(node.site).kind == SiteKind.external:
                    raise ValueError(f"local_cluster node on external site {node.site!r}: external sites run no nodes")
        return self

    def control_plane_dump(self) -> dict:
        """The config as routers and the ledger get it: without what only engine replicas use
        (``ENGINE_ONLY_FIELDS``). A new model version, source, env or extra engine arguments then
        changes only the engine deployments' arguments, so a redeploy rolls the engines alone,
        never the routers (in-flight streams) or the ledger (admissions)."""
        raw = self.model_dump(mode="json")
        for model in raw["models"]:
            for field in ENGINE_ONLY_FIELDS:
                model.pop(field, None)
            model["source"] = ENGINE_ONLY_SOURCE
            model["engine"].pop("extra_args", None)
        return raw

    @property
    def autoscaled(self) -> bool:
        """Whether any deployment scales on the routers' spill pressure (the app then runs the
        cloud scaler, ``ops/autoscale.py``)."""
        return any(model.autoscaling for model in self.models)

    def site(self, name: str) -> SiteConfig:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    def model(self, model_id: str) -> ModelConfig:
        for model in self.models:
            if model.id == model_id:
                return model
        raise KeyError(model_id)

    @property
    def router_site(self) -> SiteConfig:
        if self.router.site is not None:
            return self.site(self.router.site)
        ordered = sorted(self.sites, key=lambda s: (s.kind != SiteKind.onprem, s.preference))
        return ordered[0]


def _check_policy_names(router: "RouterConfig") -> None:
    """Unknown policy names and bad policy parameters fail at load, not at the first request."""
    from serve_app.policy.detectors import DetectorSet
    from serve_app.policy.placement import PlacementPipeline
    from serve_app.policy.registry import make
    from serve_app.policy.spill import SpillPredictor

    try:
        DetectorSet.from_names(router.pii_detectors, router.policy_params)
        PlacementPipeline.from_names(router.filters, router.scorers, params=router.policy_params)
        make(SpillPredictor, router.spill_predictor, router.policy_params.get(router.spill_predictor))
    except ConfigError as exc:
        raise ValueError(exc.message) from None
    known = {*router.pii_detectors, *router.filters, *router.scorers, router.spill_predictor, "max_score"}
    unknown = set(router.policy_params) - known
    if unknown:
        raise ValueError(f"router.policy_params names policies that are not configured: {sorted(unknown)}")


def _check_semantic_routes(config: "SpillwayConfig") -> None:
    models = {m.id: m for m in config.models}
    for alias, route in config.router.semantic_routes.items():
        if alias in models or alias in config.router.splits:
            raise ValueError(f"semantic route alias {alias!r} is also a model id or a split alias")
        embedder = models.get(route.embedding_model)
        if embedder is None or embedder.engine.runner != "pooling":
            raise ValueError(f"semantic route {alias!r}: embedding_model {route.embedding_model!r} is not a configured "
                             "embedding model (engine.runner: pooling)")
        for name, target in route.targets.items():
            for field, model_id in (("model", target.model), ("confidential_fallback", target.confidential_fallback)):
                if model_id is None:
                    continue
                model = models.get(model_id)
                if model is None:
                    raise ValueError(f"semantic route {alias!r}: target {name!r} names unknown {field} {model_id!r}")
                if model.engine.runner != "generate":
                    raise ValueError(f"semantic route {alias!r}: target {name!r}: {model_id!r} is an embedding model")


def load_config(source: str | Path | dict) -> SpillwayConfig:
    """Load and validate a config from a YAML path, a YAML string, or a dict."""
    if isinstance(source, dict):
        raw = source
    else:
        text = source
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if path is not None:
            if not path.exists():
                raise ConfigError(f"config file {path} does not exist")
            text = path.read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config must be a YAML mapping at the top level")
    from pydantic import ValidationError

    try:
        return SpillwayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None


def _format_validation(exc) -> str:
    lines = ["invalid Spillway config:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


ENGINE_ONLY_FIELDS = ("version", "env", "graceful_shutdown_timeout_s", "rollout_surge_percent")
ENGINE_ONLY_SOURCE = "(engine replicas only)"

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / "cluster_configs" / "local.yaml"


__all__ = [
    "DEFAULT_CONFIG_PATH", "DataClassName", "EngineConfig", "EnginePortConfig", "GovernanceConfig", "HttpConfig",
    "IngressKind", "StoreConfig", "StoreKind",
    "LocalClusterConfig", "LocalNodeConfig", "ModelConfig", "QueueConfig", "ReplicaResources", "RouterConfig",
    "AutoscalingConfig", "SiteConfig", "SiteKind", "SplitConfig", "SpillwayConfig", "Strict", "TracingConfig", "TracingExporter",
    "load_config",
]
