"""The Router deployment: Spillway's OpenAI-compatible front door (a FastAPI ingress).

Per request it checks the body (size, JSON, model), picks an engine deployment
through the placement, dispatches with a Ray Serve streaming call and relays
what the engine produced. Engine SSE events pass through as they are, never
re-encoded. Errors are ``SpillwayError``s, turned into OpenAI-format bodies in
one place (``_error_response``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.engine import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS
from serve_app.config import SpillwayConfig
from serve_app.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    SpillwayError,
    error_body,
)
from serve_app.router.placement import SitePreferencePlacement, SiteTarget

logger = logging.getLogger("spillway.router")

HEADER_REQUEST_ID = "x-request-id"
HEADER_SITE = "x-spillway-site"
HEADER_MODEL = "x-spillway-model"
SSE_MEDIA_TYPE = "text/event-stream"
RETRY_AFTER_UNAVAILABLE_S = 5
HEALTH_PROBE_TIMEOUT_S = 5.0

api = FastAPI(title="Spillway", docs_url=None, redoc_url=None, openapi_url=None)


def _router_headers(request: Request) -> dict[str, str]:
    """Answers the router gives itself (errors, /v1/models, /health) were served at the router's site."""
    site = getattr(request.app.state, "router_site", None)
    return {HEADER_SITE: site} if site else {}


def _error_response(exc: SpillwayError, request: Request) -> JSONResponse:
    headers = _router_headers(request)
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(max(1, int(round(exc.retry_after_s))))
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(SpillwayError)
async def _spillway_error(request: Request, exc: SpillwayError):
    return _error_response(exc, request)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    message = "route not found" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(
        error_body(message, "invalid_request_error", exc.status_code), status_code=exc.status_code,
        headers=_router_headers(request),
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse(
        error_body(f"invalid request: {exc.errors()}", "invalid_request_error", 400), status_code=400,
        headers=_router_headers(request),
    )


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception):
    logger.exception("unexpected error on %s", request.url.path)
    body = error_body("internal error in the Spillway router; see its logs", "internal_error", 500)
    return JSONResponse(body, status_code=500, headers=_router_headers(request))


def _is_dispatch_failure(exc: BaseException) -> bool:
    """True for failures that mean 'this site could not run the request' (try another)."""
    import ray.exceptions

    return isinstance(exc, (ray.exceptions.RayError, asyncio.TimeoutError, ConnectionError))


@serve.ingress(api)
class Router:
    """Front door for every model. Holds no global state: any replica can serve any request."""

    def __init__(self, config: dict, engines: dict[str, dict[str, Any]]):
        self._config = SpillwayConfig.model_validate(config)
        self._placement = SitePreferencePlacement(self._config, engines)
        self._created = int(time.time())
        self._site_headers = {HEADER_SITE: self._config.router_site.name}
        api.state.router_site = self._config.router_site.name

    # ---- endpoints -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> Response:
        report = await self._engine_report()
        healthy = all(any(site["healthy"] for site in sites.values()) for sites in report.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "models": report},
            status_code=200 if healthy else 503, headers=self._site_headers,
        )

    @api.get("/v1/models")
    async def list_models(self) -> Response:
        data = [
            {
                "id": model.id,
                "object": "model",
                "created": self._created,
                "owned_by": "spillway",
                "max_model_len": model.engine.max_model_len,
                "sites": sorted(site for site, n in model.replicas.items() if n > 0),
            }
            for model in self._config.models
        ]
        return JSONResponse({"object": "list", "data": data}, headers=self._site_headers)

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str) -> Response:
        for model in self._config.models:
            if model.id == model_id:
                return JSONResponse(
                    {"id": model.id, "object": "model", "created": self._created, "owned_by": "spillway"},
                    headers=self._site_headers,
                )
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ENDPOINT_CHAT)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, ENDPOINT_COMPLETIONS)

    # ---- request path ----------------------------------------------------------------

    async def _serve(self, request: Request, endpoint: str) -> Response:
        request_id = request.headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
        body = await self._read_body(request)
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        targets = self._placement.candidates(model_id)
        if not targets:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        stream = bool(body.get("stream"))
        target, status, results = await self._dispatch(targets, endpoint, body, request_id)
        # x-request-id itself is set on every response by Serve's proxy (from the client's header if sent).
        headers = {HEADER_SITE: target.site.name, HEADER_MODEL: model_id}
        if status != 200 or not stream:
            payload = await results.__anext__()
            return Response(payload, status_code=status, media_type="application/json", headers=headers)
        return StreamingResponse(self._relay(results, request_id), media_type=SSE_MEDIA_TYPE, headers=headers)

    async def _read_body(self, request: Request) -> dict:
        limit = self._config.router.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        return body

    async def _dispatch(
        self, targets: list[SiteTarget], endpoint: str, body: dict, request_id: str
    ) -> tuple[SiteTarget, int, Any]:
        """Send to the first target that answers; returns it, the status and the result stream.

        Failover here is safe: nothing has been sent to the client yet.
        """
        timeout_s = self._config.router.first_response_timeout_s
        failures = []
        for target in targets:
            results = target.handle.options(stream=True).generate.remote(endpoint, body, request_id)
            try:
                status = await asyncio.wait_for(results.__anext__(), timeout=timeout_s)
                return target, status, results
            except Exception as exc:  # noqa: BLE001 - classified just below
                results.cancel()
                if not _is_dispatch_failure(exc):
                    raise
                logger.warning("request %s: site %s failed before responding: %r", request_id, target.site.name, exc)
                failures.append(f"{target.site.name}: {type(exc).__name__}")
        raise EngineUnavailable(
            f"no engine could take the request for model '{body.get('model')}' ({'; '.join(failures)}); retry later",
            retry_after_s=RETRY_AFTER_UNAVAILABLE_S,
        )

    async def _relay(self, results, request_id: str) -> AsyncIterator[str]:
        """Pass engine events through; a failure mid-stream becomes an explicit error event."""
        finished = False
        try:
            async for event in results:
                yield event
            finished = True
        except Exception as exc:  # noqa: BLE001 - the client must see an error, never a silent truncation
            logger.warning("request %s: engine failed mid-stream: %r", request_id, exc)
            body = error_body("the engine failed while streaming; the response is incomplete", "engine_error", 502)
            yield f"data: {json.dumps(body)}\n\n"
            finished = True
        finally:
            if not finished:
                # The client went away: stop the engine's work for this request.
                results.cancel()

    async def _engine_report(self) -> dict[str, dict[str, Any]]:
        async def probe(target: SiteTarget) -> dict[str, Any]:
            try:
                stats = await asyncio.wait_for(target.handle.stats.remote(), timeout=HEALTH_PROBE_TIMEOUT_S)
                return {"healthy": True, **stats}
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy for this probe
                return {"healthy": False, "error": type(exc).__name__}

        report: dict[str, dict[str, Any]] = {}
        for model_id in self._placement.models():
            targets = self._placement.candidates(model_id)
            results = await asyncio.gather(*(probe(t) for t in targets))
            report[model_id] = {t.site.name: r for t, r in zip(targets, results)}
        return report

