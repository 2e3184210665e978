"""The router: its replicas, the edge's limits, classification, placement, spill and dispatch."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from serve_app.config.base import DataClassName, Strict
from serve_app.config.models import SplitConfig
from serve_app.config.semantic import SemanticRouteConfig
from serve_app.policy.detectors import DEFAULT_DETECTORS as DEFAULT_PII_DETECTORS
from serve_app.policy.filters import DEFAULT_FILTERS
from serve_app.policy.scorers import DEFAULT_SCORERS


class RouterConfig(Strict):
    replicas: int = Field(default=1, ge=1, description="Router (ingress) replicas.")
    num_cpus: float = Field(default=0.5, ge=0, description="Logical CPUs per router replica.")
    site: str | None = Field(
        default=None,
        description="Site the router replicas run on; defaults to the most preferred on-prem site, because "
        "the router sees every prompt.",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="Largest request body accepted (413 past it).")
    body_timeout_s: float = Field(
        default=20.0, gt=0, le=3600,
        description="A request's whole body must arrive within this many seconds of its head (408 past it), so a "
        "client that trickles its body, or stops half-way, holds a router's request slot no longer. Keep it under "
        "http.client_timeout_s, so a client gone quiet gets this OpenAI-format 408 rather than HAProxy's page.")
    max_ongoing_requests: int = Field(default=1024, gt=0, description="Requests one router replica holds at once.")
    graceful_shutdown_timeout_s: float | None = Field(
        default=None, gt=0,
        description="How long a stopping router replica (an update, a scale-down) lets the requests it holds "
        "finish, streams included; it takes no new ones meanwhile. Default: the longest of the models' "
        "graceful_shutdown_timeout_s (Serve's own default, 20 s, would cut longer streams).")
    serve_access_log: bool = Field(
        default=False,
        description="Ray Serve's own access line per request in the router replicas' logs/serve/ files. Off by "
        "default: every request already has its audit record (governance.audit), its metrics and, with tracing, "
        "its trace, and the line costs the router about 6 % of its per-request CPU.",
    )
    max_json_depth: int = Field(default=64, ge=2, le=512, description="Deepest nesting of a request body (400 past it).")
    max_n: int = Field(default=16, ge=1, description="Largest `n` (sequences per prompt) accepted (400 past it).")
    max_prompts: int = Field(default=64, ge=1, description="Prompts in one completions request (400 past it).")
    max_embedding_inputs: int = Field(
        default=256, ge=1, description="Inputs in one embeddings request (400 past it).")
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
    semantic_routes: dict[str, SemanticRouteConfig] = Field(
        default_factory=dict,
        description="Model aliases routed by meaning (e.g. {auto: {...}}): each request goes to the target whose "
        "description and examples its prompt is most like. See serve_app/config/semantic.py.")
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
