"""The Router deployment: Spillway's front door on Ray Serve.

It builds the gateway (the request path, ``serve_app/pipeline/``) and serves its routes
(``serve_app/http/routes.py``). With ``http.ingress: shared`` (the default) the replica listens on
the clients' port itself, beside the node's other router replicas (``serve_app/http/listener.py``);
Serve's proxy and direct ingress reach the same app through ``__serve_build_asgi_app__``. On
shutdown it drains its listener, then stops the gateway's pollers and closes its connections,
scan helpers and span exporter.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.config import SpillwayConfig
from serve_app.http.listener import SharedListener
from serve_app.http.routes import build_api
from serve_app.pipeline.gateway import Gateway

DEFAULT_GRACE_S = 60.0
DRAIN_MARGIN_S = 2.0  # the listener's drain ends this long before Serve's force-kill deadline


def router_grace_s(config: SpillwayConfig) -> float:
    """How long a stopping router replica lets the requests it holds finish (Serve's
    ``graceful_shutdown_timeout_s`` for the router deployment)."""
    return config.router.graceful_shutdown_timeout_s or max(
        (m.graceful_shutdown_timeout_s for m in config.models), default=DEFAULT_GRACE_S)


@serve.ingress()
class Router:
    """Front door for every model. Holds no global state: any replica can serve any request."""

    async def __init__(self, config: dict, engines: dict[str, dict[str, Any]], ledger: Any = None,
                       operator: Any = None):
        spillway = SpillwayConfig.model_validate(config)
        self._gateway = Gateway(spillway, engines, ledger=ledger, operator=operator)
        # The replica's Serve id: x-spillway-router and the reports name the replica as Ray does.
        context = serve.get_replica_context()
        self._gateway.replica_tag = context.replica_id.unique_id
        self._gateway.app_name = context.app_name  # (where the operator publishes this app's split weights)
        self._api = build_api(self._gateway)
        self._listener: SharedListener | None = None
        http = spillway.http
        if http.ingress == "shared":
            self._listener = SharedListener(
                self._api, http.host, http.port, head_timeout_s=http.client_timeout_s,
                max_connections=http.max_connections, max_ongoing_requests=spillway.router.max_ongoing_requests,
                grace_s=max(1.0, router_grace_s(spillway) - DRAIN_MARGIN_S))
            await self._listener.start()

    def __serve_build_asgi_app__(self):
        return self._api

    async def check_health(self) -> None:
        """Serve restarts a replica whose listener stopped: it would hold the port's share of
        connections in nobody's hands otherwise (the kernel only skips closed listeners)."""
        if self._listener is not None and not self._listener.serving:
            raise RuntimeError("the router's listener on the clients' port has stopped")

    async def __del__(self):
        # Serve counts no request that came through the listener, so its drain ends at once:
        # the listener's own drain is the one that lets the clients' requests finish. (Serve also
        # calls this after a constructor that failed half-way: only what exists is closed.)
        listener, gateway = getattr(self, "_listener", None), getattr(self, "_gateway", None)
        if listener is not None:
            await listener.close()
        if gateway is not None:
            await gateway.close()
