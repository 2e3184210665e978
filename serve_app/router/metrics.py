"""The router's Prometheus metrics, exported through Ray's metrics agent on every node.

Ray prefixes application metrics with ``ray_``: ``ray_spillway_requests_total`` and so on.
Tags never carry prompt text, tenants' data or request ids: only model, site, outcome, reason.
"""

from __future__ import annotations

QUEUE_WAIT_BOUNDARIES_MS = [1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000]


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
            description="Requests placed off the preferred site, by reason (onprem_wait_over_budget, failover).",
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

    def admitted(self, model: str, site: str, queue_ms: float, spill_reason: str, queued: int, in_flight: int) -> None:
        self._queue_wait.observe(queue_ms, tags={"model": model})
        self._queue_depth.set(queued, tags={"model": model})
        self._in_flight.set(in_flight, tags={"model": model, "site": site})
        if spill_reason != "none":
            self._spills.inc(tags={"model": model, "reason": spill_reason})

    def finished(self, model: str, site: str, outcome: str) -> None:
        self._requests.inc(tags={"model": model, "site": site, "outcome": outcome})
