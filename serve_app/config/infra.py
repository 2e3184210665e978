"""What surrounds the router: tracing, the HTTP ingress, the engines' port, the local cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from serve_app.config.base import Strict


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


IngressKind = Literal["shared", "haproxy", "direct", "proxy"]


class HttpConfig(Strict):
    host: str = Field(default="127.0.0.1", description="Address clients connect to.")
    port: int = Field(default=8000, gt=0, lt=65536, description="Port clients connect to.")
    ingress: IngressKind = Field(
        default="shared",
        description="shared: every router replica listens on `port` itself (SO_REUSEPORT: the kernel spreads new "
        "connections over the replicas on a node) and serves its clients directly: no proxy process and no extra hop "
        "per token. Serve's own proxy moves to `fallback_proxy_port`. haproxy: Ray Serve's HAProxy listens on `port` "
        "and balances each request over the router replicas, which serve HTTP themselves (direct ingress). direct: "
        "router replicas listen themselves, the first on `port` (one port per replica; put a balancer in front of "
        "several). proxy: Ray Serve's Python proxy (one more process on every token). haproxy and direct need the "
        "environment `ingress_env` gives on every Ray node; `spillway up --local` sets it.",
    )
    router_port_base: int | None = Field(
        default=None, gt=0, lt=65536,
        description="haproxy: first port of the router replicas' range (default port + 100).",
    )
    fallback_proxy_port: int | None = Field(
        default=None, gt=0, lt=65536,
        description="shared: Serve's head-node proxy (the slow path, for Serve's own tools). haproxy: the same "
        "proxy as HAProxy's backup when no router is up. Default port + 150.",
    )
    haproxy_metrics_port: int | None = Field(
        default=None, gt=0, lt=65536, description="haproxy: HAProxy's Prometheus port (default port + 151).")
    haproxy_stats_port: int | None = Field(
        default=None, gt=0, lt=65536, description="haproxy: HAProxy's stats page port (default port + 152).")
    client_timeout_s: int = Field(
        default=30, gt=0, le=3600,
        description="shared, haproxy: a client connection that sends nothing this long while a request is expected "
        "(a new connection's first request, the next one on a kept-alive connection, or with haproxy a body) is "
        "closed (Serve's default is an hour). Long answers are not cut: while the client waits for one it is "
        "expected to send nothing. (A body that stalls is router.body_timeout_s's.)")
    max_connections: int = Field(
        default=4096, gt=0, le=1_000_000,
        description="shared: client connections one router replica holds at once; at it, the connection that has "
        "waited longest without sending a request is closed for a new one, and only when all have a request in "
        "progress does a new one get a 503. haproxy: HAProxy's maxconn; past it new ones wait in the kernel's "
        "accept queue. Per-source limits belong to the network in front (see the README's trust model).")

    def router_ports(self, router_replicas: int) -> range:
        """Where router replicas listen (direct and haproxy ingress)."""
        first = self.port if self.ingress == "direct" else (self.router_port_base or self.port + 100)
        return range(first, first + router_replicas + 8)

    def extra_ports(self, router_replicas: int) -> dict[str, int]:
        """Every port the ingress takes besides `port`, by name (for clash checks)."""
        if self.ingress == "proxy":
            return {}
        if self.ingress == "shared":
            return {"http.fallback_proxy_port": self.proxy_port(router_replicas)}
        ports = self.router_ports(router_replicas)
        if self.ingress == "direct":  # the routers' range starts at `port` itself
            return {"http.router_ports (last)": ports[-1], "http.proxy_port": self.proxy_port(router_replicas)}
        return {"http.router_ports (first)": ports[0], "http.router_ports (last)": ports[-1],
                "http.fallback_proxy_port": self.fallback_proxy_port or self.port + 150,
                "http.haproxy_metrics_port": self.haproxy_metrics_port or self.port + 151,
                "http.haproxy_stats_port": self.haproxy_stats_port or self.port + 152}

    def ingress_env(self, router_replicas: int) -> dict[str, str]:
        """Environment every Ray node needs for this ingress (empty for shared and the Python proxy)."""
        if self.ingress in ("shared", "proxy"):
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
                "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(self.client_timeout_s),
                "RAY_SERVE_HAPROXY_MAXCONN": str(self.max_connections),
            })
        return env

    def proxy_port(self, router_replicas: int) -> int:
        """The port of Serve's own proxy. HAProxy takes `port` itself in haproxy mode, and the router
        replicas in shared mode (the proxy moves to `fallback_proxy_port`). With direct ingress Serve
        still starts a head-node proxy: it gets the port after the routers' range."""
        if self.ingress == "shared":
            return self.fallback_proxy_port or self.port + 150
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
