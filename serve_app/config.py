"""Spillway's one configuration model.

The same YAML drives ``spillway up --local``, ``serve deploy`` (through
``serve_app.app:app_builder``) and the tests. Every model is strict
(``extra="forbid"``): a misspelt key fails at load, before any GPU is paid for.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.errors import ConfigError
from serve_app.policy.detectors import DEFAULT_DETECTORS as DEFAULT_PII_DETECTORS
from serve_app.policy.filters import DEFAULT_FILTERS
from serve_app.policy.scorers import DEFAULT_SCORERS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DataClassName = Literal["public", "internal", "confidential", "restricted"]


class SiteKind(str, Enum):
    onprem = "onprem"
    cloud = "cloud"
    external = "external"


class SiteConfig(Strict):
    name: str = Field(description="Short name of the site, used in headers, metrics and replica placement.")
    resource: str = Field(
        description="Ray custom resource that every node of this site carries (e.g. 'site:onprem'). "
        "Every placement-group bundle of a replica on this site asks for a sliver of it."
    )
    kind: SiteKind = Field(description="onprem: own hardware; cloud: elastic capacity; external: an outside API.")
    preference: int = Field(
        default=0,
        ge=0,
        description="Lower is preferred when a request could run on several sites (on-prem first by default).",
    )
    trusted_up_to: DataClassName | None = Field(
        default=None,
        description="Most sensitive data class this site may process. Default: restricted for onprem, "
        "internal for cloud and external sites (so confidential data never leaves on-prem).",
    )
    cost_per_1k_tokens: float = Field(default=0.0, ge=0, description="Price of 1,000 tokens served here (cost model).")
    engine_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for every engine replica on this site, over the model's env (e.g. CPU binding).",
    )

    @property
    def trust(self) -> str:
        if self.trusted_up_to is not None:
            return self.trusted_up_to
        return "restricted" if self.kind == SiteKind.onprem else "internal"

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", value):
            raise ValueError("site name must be a lowercase slug (a-z, 0-9, '-'), at most 32 characters")
        return value


class EngineConfig(Strict):
    """vLLM engine arguments. Named fields are the common knobs; ``extra_args`` passes any other
    ``AsyncEngineArgs`` field through unchanged (checked against vLLM when the app is built)."""

    max_model_len: int = Field(default=2048, gt=0, description="Context length in tokens (prompt + output).")
    max_num_seqs: int = Field(default=32, gt=0, description="Sequences one replica runs at once (its slots).")
    dtype: str = Field(default="auto", description="Weight/activation dtype: auto, bfloat16, float16, float32.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="Tensor-parallel workers per replica.")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="Pipeline stages per replica.")
    enable_expert_parallel: bool = Field(default=False, description="Shard MoE experts across the TP/DP workers.")
    quantization: str | None = Field(default=None, description="vLLM quantization method (awq, gptq, fp8, ...).")
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs (no effect on CPU).")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="Fraction of GPU memory vLLM may use (GPU only)."
    )
    seed: int = Field(default=0, description="Engine seed; per-request `seed` still wins.")
    tool_parser: str | None = Field(
        default="hermes",
        description="vLLM tool-call parser for tool_choice='auto' (e.g. hermes, llama3_json, mistral). "
        "None disables automatic tool choice.",
    )
    chat_template: str | None = Field(
        default=None, description="Path to a Jinja chat template overriding the tokenizer's one."
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Other AsyncEngineArgs fields, passed through unchanged."
    )

    @property
    def workers_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ReplicaResources(Strict):
    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs per replica (the first bundle).")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per engine worker (0 on CPU-only sites).")
    memory_gib: float | None = Field(default=None, gt=0, description="Ray memory reservation per replica.")


class QueueConfig(Strict):
    max_len: int = Field(default=256, ge=0, description="Requests that may wait for a slot; past it, 429.")
    max_wait_ms: float = Field(default=30_000, gt=0, description="Longest wait for a slot; past it, 503.")
    priority_aging_ms: float = Field(default=2_000, gt=0, description="Waiting this long earns one priority level.")


class ModelConfig(Strict):
    id: str = Field(description="The model name clients send in `model` and see in /v1/models.")
    source: str = Field(
        description="Where the weights come from: 'builtin:dense' / 'builtin:moe' (generated by "
        "`spillway models prepare`), a local folder, or a Hugging Face hub id (org/name)."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: dict[str, int] = Field(
        description="Replicas of this model per site name, e.g. {onprem: 1, cloud: 2}. 0 declares the site "
        "eligible without starting a replica."
    )
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the engine replicas (VLLM_*, OMP_*, ...)."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=60.0, gt=0, description="How long a stopping replica lets in-flight streams finish."
    )
    spill_after_ms: float = Field(
        default=2_000,
        gt=0,
        description="TTFT budget: a request may spill to a less preferred site when its predicted wait for "
        "a slot on the preferred site exceeds this.",
    )
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Admission queue bounds.")
    prior_itl_ms: float = Field(
        default=30.0, gt=0,
        description="Time per output token the spill predictor assumes until the engines report their own.",
    )
    prior_ttft_ms: float = Field(
        default=250.0, gt=0,
        description="Time to first token the spill predictor assumes until the engines report their own.",
    )

    @field_validator("replicas")
    @classmethod
    def _replicas_non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one site must be listed under replicas")
        for site, count in value.items():
            if count < 0:
                raise ValueError(f"replicas for site {site!r} must be >= 0, got {count}")
        return value


class SplitConfig(Strict):
    variants: dict[str, float] = Field(
        description="Model ids and their weights, e.g. {model-a: 90, model-b: 10}. A request with a `user` field "
        "or an x-session-id header always gets the same variant."
    )

    @field_validator("variants")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("a split needs at least one variant")
        if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("split weights must be >= 0 and sum to more than 0")
        return value


class RouterConfig(Strict):
    replicas: int = Field(default=1, ge=1, description="Router (ingress) replicas.")
    num_cpus: float = Field(default=0.5, ge=0, description="Logical CPUs per router replica.")
    site: str | None = Field(
        default=None,
        description="Site the router replicas run on; defaults to the most preferred on-prem site, because "
        "the router sees every prompt.",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="Largest request body accepted (413 past it).")
    max_ongoing_requests: int = Field(default=1024, gt=0, description="Requests one router replica holds at once.")
    max_json_depth: int = Field(default=64, ge=2, le=512, description="Deepest nesting of a request body (400 past it).")
    max_n: int = Field(default=16, ge=1, description="Largest `n` (sequences per prompt) accepted (400 past it).")
    max_prompts: int = Field(default=64, ge=1, description="Prompts in one completions request (400 past it).")
    max_messages: int = Field(default=4096, ge=1, description="Messages in one chat request (400 past it).")
    inline_scan_max_bytes: int = Field(
        default=16_384, ge=0,
        description="Bodies up to this size are parsed and scanned for PII on the router's event loop; larger "
        "ones in a helper process, so a hostile body never stalls other requests.",
    )
    scan_workers: int = Field(default=1, ge=1, description="Helper processes that scan large bodies, per router.")
    pii_detectors: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PII_DETECTORS),
        description="PII detectors (by registered name) that raise a request's data class.",
    )
    default_data_class: DataClassName = Field(
        default="public", description="Data class of a request without an x-data-classification header."
    )
    opaque_data_class: DataClassName = Field(
        default="confidential",
        description="Class of a request holding content the router cannot scan as text (token-id prompts, "
        "images, audio, files, embeddings), unless the client declares a class with x-data-classification.",
    )
    filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS), description="Placement filters, in order (by name)."
    )
    scorers: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SCORERS), description="Placement scorers (by name) and their weights."
    )
    policy_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Parameters of named policies (filters, scorers, PII detectors), e.g. "
        "{affinity: {max_keys: 50000}, phone: {regions: [CH, DE]}}; checked against each policy's model at load.",
    )
    spill_predictor: str = Field(default="backlog", description="How the predicted on-prem start is computed (by name).")
    spill_close_ratio: float = Field(
        default=0.5, gt=0, le=1,
        description="While requests spill on prediction, their budget is spill_after_ms x this ...",
    )
    spill_min_hold_ms: float = Field(default=5_000, ge=0, description="... until nothing was predicted over it this long.")
    spill_margin_ms: float = Field(default=50, ge=0, description="A request spills this long before its budget runs out.")
    assumed_output_tokens: int = Field(
        default=256, gt=0, description="Output tokens the predictor assumes for a request without max_tokens, until "
        "it has measured some.",
    )
    splits: dict[str, SplitConfig] = Field(
        default_factory=dict, description="Model aliases split across model variants by weight (A/B, canary)."
    )
    load_poll_interval_ms: float = Field(
        default=250,
        gt=0,
        description="How often each router replica polls the engines' live load (sequences in flight, which "
        "includes other routers' share, KV-cache use and step times).",
    )
    benchmark_modes: bool = Field(
        default=False,
        description="Accept x-spillway-routing: pow2 (Ray Serve-style power of two over all sites, no admission, "
        "no residency) or onprem-only, so the routing benchmark compares policies on the same engines. "
        "Never enable in production: pow2 ignores residency.",
    )
    max_dispatch_attempts: int = Field(
        default=3, ge=1, description="Engines tried for one request before its first token (failover)."
    )
    first_response_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest the router waits for an engine to accept a request (a stream's header, a "
        "non-streamed request's acceptance) before trying another replica, and finally answering 503. "
        "Generation itself is not bounded by it.",
    )
    replica_cooldown_s: float = Field(
        default=5.0, gt=0,
        description="A replica that failed to take a request (transport failure, dead engine) gets none for this long.",
    )
    direct_dispatch: bool = Field(
        default=True,
        description="Send requests straight to engine replicas over their ports (replicas list their "
        "address in Ray's KV store) instead of one Ray Serve call each; Serve remains the fallback for a replica "
        "the router does not know yet, one that refuses, or one that is draining.",
    )


TracingExporter = Literal["none", "console", "otlp-http", "otlp-grpc", "memory"]


class TracingConfig(Strict):
    """OpenTelemetry traces: one span tree per request (router, classification, admission,
    generation), joined by vLLM's own spans when the exporter is OTLP."""

    exporter: TracingExporter = Field(
        default="none",
        description="'otlp-http' / 'otlp-grpc' send to `endpoint`; 'console' prints spans to the replica log; "
        "'memory' keeps the last spans in the router (served at /v1/spillway/debug/spans, for tests); 'none' is off.",
    )
    endpoint: str | None = Field(
        default=None, description="OTLP collector, e.g. http://otel-collector:4318/v1/traces (http) or host:4317 (grpc)."
    )
    sample_ratio: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Share of traces sampled at the router (parent-based: a sampled incoming traceparent is kept). "
        "Set explicitly; Ray Serve's own default would be 1%.",
    )
    record_content: bool = Field(
        default=False, description="Put prompt (and non-streamed completion) text on spans. Off: spans carry no text."
    )
    engine_spans: bool = Field(
        default=True, description="vLLM exports its own request spans into the same trace (needs an OTLP endpoint)."
    )
    engine_endpoint: str | None = Field(
        default=None, description="OTLP endpoint for vLLM's spans; default: `endpoint` when the exporter is OTLP.",
    )
    engine_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        default=None, description="Protocol of `engine_endpoint`; default: the exporter's (grpc unless otlp-http).",
    )
    export_interval_ms: int = Field(default=1000, gt=0, description="How often batched spans are exported.")
    service_name: str = Field(default="spillway", description="OpenTelemetry service.name of router spans.")

    @model_validator(mode="after")
    def _endpoint_for_otlp(self) -> "TracingConfig":
        if self.exporter.startswith("otlp") and not self.endpoint:
            raise ValueError(f"tracing.exporter {self.exporter!r} needs tracing.endpoint")
        return self

    @property
    def engine_otlp_endpoint(self) -> str | None:
        if not self.engine_spans:
            return None
        if self.engine_endpoint:
            return self.engine_endpoint
        return self.endpoint if self.exporter.startswith("otlp") else None

    @property
    def engine_otlp_protocol(self) -> str:
        if self.engine_protocol:
            return self.engine_protocol
        return "http/protobuf" if self.exporter == "otlp-http" else "grpc"


IngressKind = Literal["haproxy", "direct", "proxy"]


class HttpConfig(Strict):
    host: str = Field(default="127.0.0.1", description="Address clients connect to.")
    port: int = Field(default=8000, gt=0, lt=65536, description="Port clients connect to.")
    ingress: IngressKind = Field(
        default="haproxy",
        description="haproxy: Ray Serve's HAProxy listens on `port` and balances over the router replicas, which "
        "serve HTTP themselves (direct ingress): no Python proxy touches a token, and any number of routers share "
        "one port. direct: router replicas listen themselves, the first on `port` (one port per replica; put a "
        "balancer in front of several). proxy: Ray Serve's Python proxy (one more process on every token). Every "
        "Ray node needs the environment `ingress_env` gives; `spillway up --local` sets it.",
    )
    router_port_base: int | None = Field(
        default=None, gt=0, lt=65536,
        description="haproxy: first port of the router replicas' range (default port + 100).",
    )
    fallback_proxy_port: int | None = Field(
        default=None, gt=0, lt=65536,
        description="haproxy: Serve's head-node proxy, HAProxy's backup when no router is up (default port + 150).",
    )
    haproxy_metrics_port: int | None = Field(
        default=None, gt=0, lt=65536, description="haproxy: HAProxy's Prometheus port (default port + 151).")
    haproxy_stats_port: int | None = Field(
        default=None, gt=0, lt=65536, description="haproxy: HAProxy's stats page port (default port + 152).")

    def router_ports(self, router_replicas: int) -> range:
        """Where router replicas listen (direct and haproxy ingress)."""
        first = self.port if self.ingress == "direct" else (self.router_port_base or self.port + 100)
        return range(first, first + router_replicas + 8)

    def extra_ports(self, router_replicas: int) -> dict[str, int]:
        """Every port the ingress takes besides `port`, by name (for clash checks)."""
        if self.ingress == "proxy":
            return {}
        ports = self.router_ports(router_replicas)
        if self.ingress == "direct":  # the routers' range starts at `port` itself
            return {"http.router_ports (last)": ports[-1], "http.proxy_port": self.proxy_port(router_replicas)}
        return {"http.router_ports (first)": ports[0], "http.router_ports (last)": ports[-1],
                "http.fallback_proxy_port": self.fallback_proxy_port or self.port + 150,
                "http.haproxy_metrics_port": self.haproxy_metrics_port or self.port + 151,
                "http.haproxy_stats_port": self.haproxy_stats_port or self.port + 152}

    def ingress_env(self, router_replicas: int) -> dict[str, str]:
        """Environment every Ray node needs for this ingress (empty for the Python proxy)."""
        if self.ingress == "proxy":
            return {}
        ports = self.router_ports(router_replicas)
        env = {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports[0]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports[-1]),
        }
        if self.ingress == "haproxy":
            extra = self.extra_ports(router_replicas)
            env.update({
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(extra["http.fallback_proxy_port"]),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(extra["http.haproxy_metrics_port"]),
                "RAY_SERVE_HAPROXY_STATS_PORT": str(extra["http.haproxy_stats_port"]),
            })
        return env

    def proxy_port(self, router_replicas: int) -> int:
        """The port of Serve's own proxy (HAProxy takes `port` itself in haproxy mode). With direct
        ingress Serve still starts a head-node proxy: it gets the port after the routers' range."""
        if self.ingress == "direct":
            return self.router_ports(router_replicas)[-1] + 1
        return self.port


class EnginePortConfig(Strict):
    """The engine replicas' direct port (deployments/stream_server.py), which routers call."""

    max_frame_bytes: int = Field(
        default=8 << 20, gt=0, description="Largest request frame accepted; must hold router.max_body_bytes.")
    max_connections: int = Field(default=1024, gt=0, description="Connections served at once; more are closed.")
    idle_timeout_s: float = Field(default=60.0, gt=0, description="A connection idle this long between frames is closed.")
    read_timeout_s: float = Field(default=10.0, gt=0, description="A frame's payload must arrive within this.")


class LocalNodeConfig(Strict):
    site: str = Field(description="Site this local Ray node stands in for.")
    num_cpus: int = Field(gt=0, description="Logical CPUs the node declares to Ray (may exceed real cores).")
    memory_gib: float | None = Field(default=None, gt=0, description="Memory the node declares to Ray.")


RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min/max-worker-port
FRAME_OVERHEAD_BYTES = 64 << 10


class LocalClusterConfig(Strict):
    nodes: list[LocalNodeConfig] = Field(description="Ray nodes started on this machine, the first is the head.")
    dashboard_port: int = Field(default=8265, gt=0, lt=65536)
    ray_port: int = Field(default=6379, gt=0, lt=65536)
    metrics_export_port: int = Field(
        default=8090, gt=0, lt=65500, description="Prometheus port of the first node; node i uses this + i."
    )


class SpillwayConfig(Strict):
    name: str = Field(default="spillway", description="Serve application name.")
    sites: list[SiteConfig]
    models: list[ModelConfig]
    router: RouterConfig = Field(default_factory=RouterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    engine_port: EnginePortConfig = Field(default_factory=EnginePortConfig)
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
            if sum(model.replicas.values()) == 0:
                raise ValueError(f"model {model.id!r} has no replica on any site")
        if self.router.site is not None and self.router.site not in site_names:
            raise ValueError(f"router.site {self.router.site!r} is not a configured site")
        _check_policy_names(self.router)
        for alias, split in self.router.splits.items():
            if alias in model_ids:
                raise ValueError(f"split alias {alias!r} is also a model id")
            unknown = set(split.variants) - set(model_ids)
            if unknown:
                raise ValueError(f"split {alias!r} names unknown model(s) {sorted(unknown)}")
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
        return self

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


DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "cluster_configs" / "local.yaml"
