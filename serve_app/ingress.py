"""The Router deployment: Spillway's front door on Ray Serve.

It builds the gateway (the request path, ``serve_app/pipeline/``) and serves its routes
(``serve_app/http/routes.py``); Serve calls ``__serve_build_asgi_app__`` once the replica is
constructed. On shutdown it stops the gateway's pollers and closes its connections, scan helpers
and span exporter.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.config import SpillwayConfig
from serve_app.http.routes import build_api
from serve_app.pipeline.gateway import Gateway


@serve.ingress()
class Router:
    """Front door for every model. Holds no global state: any replica can serve any request."""

    def __init__(self, config: dict, engines: dict[str, dict[str, Any]], ledger: Any = None, operator: Any = None):
        self._gateway = Gateway(SpillwayConfig.model_validate(config), engines, ledger=ledger, operator=operator)
        # The replica's Serve id: x-spillway-router and the reports name the replica as Ray does.
        context = serve.get_replica_context()
        self._gateway.replica_tag = context.replica_id.unique_id
        self._gateway.app_name = context.app_name  # (where the operator publishes this app's split weights)

    def __serve_build_asgi_app__(self):
        return build_api(self._gateway)

    async def __del__(self):
        await self._gateway.close()
