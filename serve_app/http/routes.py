"""Spillway's HTTP routes: OpenAI's API plus a few operator endpoints. Routes only: each one hands
its request to the gateway (``serve_app/pipeline/gateway.py``) or reads one of its reports. The
three that carry tokens (chat, completions, embeddings) are plain ASGI (``edge.py``)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import ModelNotFound
from serve_app.http import errors
from serve_app.http.admin import install_admin
from serve_app.http.edge import Edge
from serve_app.http.owner import RequestOwner
from serve_app.pipeline.gateway import Gateway


def build_api(gateway: Gateway):
    """The ASGI app serving ``gateway``: the token routes (``edge.py``) and FastAPI's routes for
    the rest, inside the request owner."""
    api = FastAPI(title="Spillway", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(api, gateway.router_site)
    site = {errors.HEADER_SITE: gateway.router_site}

    @api.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": gateway.models()}, headers=site)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        for model in gateway.models():
            if model["id"] == model_id:
                return JSONResponse({k: model[k] for k in ("id", "object", "created", "owned_by")}, headers=site)
        raise ModelNotFound(f"The model '{model_id[:256]}' does not exist", param="model")

    @api.get("/health")
    async def health() -> Response:
        healthy, report = await gateway.health()
        return JSONResponse(report, status_code=200 if healthy else 503, headers=site)

    @api.get("/v1/spillway/scheduler")
    async def scheduler_state() -> Response:
        """This router replica's view: queues, engine groups, spill gate, direct dispatch."""
        return JSONResponse(gateway.scheduler_report(), headers=site)

    @api.get("/v1/spillway/splits")
    async def split_stats() -> Response:
        """Per-variant counters of this router replica."""
        return JSONResponse(gateway.split_report(), headers=site)

    @api.get("/v1/spillway/debug/spans")
    async def debug_spans() -> Response:
        """Finished spans of this router replica, only with ``tracing.exporter: memory``."""
        if gateway.tracing.memory is None:
            raise StarletteHTTPException(404)
        return JSONResponse({"router_replica": gateway.replica_tag, "spans": gateway.tracing.memory.finished_spans()},
                            headers=site)

    install_admin(api, gateway)
    return RequestOwner(Edge(gateway, api))
