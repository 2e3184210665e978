"""The router's Prometheus metrics, exported through Ray's metrics agent on every node.

Ray prefixes application metrics with ``ray_``: ``ray_spillway_requests_total`` and so on.
Tags never carry prompt text, tenants' data or request ids: only model, site, outcome, reason.
"""

from __future__ import annotations

QUEUE_WAIT_BOUNDARIES_MS = [1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000]
TTFT_BOUNDARIES_MS = [5, 10, 25, 50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 30_000]
ITL_BOUNDARIES_MS = [1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1_280]


class RouterMetrics:
    def __init__(self):
        from ray.util import metrics

        self._requests = metrics.Counter(
            "spillway_requests_total",
            description="Requests the router finished, by model, serving site and outcome.",
            tag_keys=("model", "site", "outcome"),
        )
        self._spills = metrics.Counter(
            "spillway_spill_total",
            description="Requests placed off the preferred site, by reason (onprem_wait_over_budget, onprem_queue_full, failover).",
            tag_keys=("model", "reason"),
        )
        self._queue_wait = metrics.Histogram(
            "spillway_queue_wait_ms",
            description="Time a request waited in the router for an engine slot.",
            boundaries=QUEUE_WAIT_BOUNDARIES_MS,
            tag_keys=("model",),
        )
        self._queue_depth = metrics.Gauge(
            "spillway_queue_depth", description="Requests waiting for a slot, per model.", tag_keys=("model",)
        )
        self._in_flight = metrics.Gauge(
            "spillway_in_flight", description="Requests on engines, per model and site.", tag_keys=("model", "site")
        )

        self._ttft = metrics.Histogram(
            "spillway_ttft_ms",
            description="Time to first token (first response byte) seen by the router, per model and site.",
            boundaries=TTFT_BOUNDARIES_MS,
            tag_keys=("model", "site"),
        )
        self._itl = metrics.Histogram(
            "spillway_itl_ms",
            description="Mean inter-token latency of each streamed request, per model and site.",
            boundaries=ITL_BOUNDARIES_MS,
            tag_keys=("model", "site"),
        )
        self._tokens = metrics.Counter(
            "spillway_tokens_total",
            description="Tokens processed, per model, site and direction (in = prompt, out = completion).",
            tag_keys=("model", "site", "direction"),
        )
        self._cost = metrics.Counter(
            "spillway_cost_total",
            description="Cost of the requests served, per model and site (the site's cost model; currency units).",
            tag_keys=("model", "site"),
        )
        self._budget_misses = metrics.Counter(
            "spillway_budget_miss_total",
            description="Spillable requests that waited in the router past their model's spill_after_ms while a group "
            "elsewhere had room for them.",
            tag_keys=("model",),
        )
        self._routes = metrics.Counter(
            "spillway_semantic_route_total",
            description="Requests to a semantic alias, by the target chosen and why (match, below_threshold, "
            "no_text, embedding_unavailable).",
            tag_keys=("alias", "target", "reason"),
        )
        self._route_latency = metrics.Histogram(
            "spillway_semantic_route_ms",
            description="Time the semantic routing step added to a request (its prompt's embedding included).",
            boundaries=QUEUE_WAIT_BOUNDARIES_MS,
            tag_keys=("alias",),
        )
        self._kv_cache = metrics.Gauge(
            "spillway_engine_kv_cache_usage",
            description="KV-cache use (0-1) of an engine group's replica, as last polled by the router.",
            tag_keys=("model", "site"),
        )

    def semantic_route(self, alias: str, target: str, reason: str, latency_ms: float) -> None:
        self._routes.inc(tags={"alias": alias, "target": target, "reason": reason})
        self._route_latency.observe(latency_ms, tags={"alias": alias})

    def admitted(self, model: str, site: str, queue_ms: float, spill_reason: str) -> None:
        self._queue_wait.observe(queue_ms, tags={"model": model})
        if spill_reason != "none":
            self._spills.inc(tags={"model": model, "reason": spill_reason})

    def budget_miss(self, model: str) -> None:
        self._budget_misses.inc(tags={"model": model})

    def finished(self, model: str, site: str, outcome: str) -> None:
        self._requests.inc(tags={"model": model, "site": site, "outcome": outcome})

    def served(
        self, model: str, site: str, ttft_ms: float | None, itl_ms: float | None,
        usage: tuple[int, int] | None, cost: float,
    ) -> None:
        tags = {"model": model, "site": site}
        if ttft_ms is not None:
            self._ttft.observe(ttft_ms, tags=tags)
        if itl_ms is not None:
            self._itl.observe(itl_ms, tags=tags)
        if usage is not None:
            prompt, completion = usage
            if prompt:
                self._tokens.inc(prompt, tags={**tags, "direction": "in"})
            if completion:
                self._tokens.inc(completion, tags={**tags, "direction": "out"})
            if cost:
                self._cost.inc(cost, tags=tags)

    def engine_load(self, model: str, site: str, kv_cache_usage: float, in_flight: int) -> None:
        tags = {"model": model, "site": site}
        self._kv_cache.set(kv_cache_usage, tags=tags)
        self._in_flight.set(in_flight, tags=tags)

    def queue(self, model: str, queued: int) -> None:
        self._queue_depth.set(queued, tags={"model": model})
