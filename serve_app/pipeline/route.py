"""Stage: semantic routing, for a request whose ``model`` is a semantic alias (``auto``).

It runs after classification, because embedding the prompt sends its text to an engine: the
internal embeddings request (``embedder.py``) is placed under the prompt's own data class. It
picks the model (``policy/semantic.py``); the resolve stage then checks that model as if the
client had named it, and placement later picks the site. A target's model that may not see the
prompt (its data class is above every site the model runs on, or the key's traffic must stay
on-prem and the model runs on no on-prem site) is swapped for the target's
``confidential_fallback``; without one the request gets 403. A prompt is never sent where it may
not go, only refused.

The anchors (each target's description and examples) are embedded once per router replica, by a
background task started with the gateway (``warm``); a request that arrives before that waits up
to ``embed_timeout_s``. When the embedding model cannot answer in time, the request goes to the
default target (reason ``embedding_unavailable``): routing degrades, serving does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from serve_app.config import SiteKind, SpillwayConfig
from serve_app.errors import InvalidRequest, ModelNotAllowed
from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.embedder import PipelineEmbedder
from serve_app.pipeline.schema import ENDPOINT_EMBEDDINGS
from serve_app.policy.classify import Classification, DataClass
from serve_app.policy.semantic import REASON_EMBEDDING_UNAVAILABLE, REASON_NO_TEXT, RouteChoice, SemanticRouter

logger = logging.getLogger("spillway.route")

WARM_RETRY_S = 2.0
ANCHOR_CLASS = Classification(DataClass.public, DataClass.public, ())  # config text, not a tenant's data


class SemanticStage:
    name = "semantic_route"

    def __init__(self, config: SpillwayConfig, embedder: PipelineEmbedder, metrics):
        self.routers = {alias: SemanticRouter(alias, route) for alias, route in config.router.semantic_routes.items()}
        self._embedder = embedder
        self._metrics = metrics
        self._ready = {alias: asyncio.Event() for alias in self.routers}
        # Per model: the most sensitive class any of its sites may see, and whether one is on-prem.
        self._trust: dict[str, DataClass] = {}
        self._onprem: dict[str, bool] = {}
        for model in config.models:
            sites = [config.site(name) for name in model.replicas if model.deploys_on(name)]
            self._trust[model.id] = max((DataClass[s.trust] for s in sites), default=DataClass.public)
            self._onprem[model.id] = any(s.kind == SiteKind.onprem for s in sites)

    async def warm(self) -> None:
        """Embed every route's anchors (retrying until the embedding model answers)."""
        for alias, router in self.routers.items():
            while not router.ready:
                try:
                    vectors = await self._embedder.embed(router.config.embedding_model, router.anchor_texts(),
                                                         ANCHOR_CLASS)
                    router.set_anchor_vectors(vectors)
                    logger.info("semantic route %r: %d anchors embedded", alias, len(vectors))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the embedding engine may still be starting
                    logger.info("semantic route %r: anchors not embedded yet (%s); retrying", alias, exc)
                    await asyncio.sleep(WARM_RETRY_S)
            self._ready[alias].set()

    async def run(self, ctx: RequestContext) -> None:
        router = self.routers.get(ctx.shape.model)
        if router is None:
            return
        if ctx.endpoint == ENDPOINT_EMBEDDINGS:
            raise InvalidRequest(f"'{router.alias}' routes chat and completions requests; embeddings need a model id",
                                 param="model")
        started = time.monotonic()
        with ctx.trace.child("spillway.semantic_route", alias=router.alias) as span:
            choice = await self._choose(router, ctx)
            choice = self._allowed(router, choice, ctx)
            if span is not None:
                span.set_attributes({"spillway.route_target": choice.target, "spillway.route_model": choice.model,
                                     "spillway.route_reason": choice.reason,
                                     **({"spillway.route_score": choice.score} if choice.score is not None else {})})
        latency_ms = (time.monotonic() - started) * 1000
        ctx.route = choice = dataclasses.replace(choice, latency_ms=round(latency_ms, 2))
        ctx.trace.set(route_target=choice.target, route_score=choice.score, route_reason=choice.reason)
        self._metrics.semantic_route(router.alias, choice.target, choice.reason, latency_ms)

    async def _choose(self, router: SemanticRouter, ctx: RequestContext) -> RouteChoice:
        text = ctx.scan.route_text
        if not text or not text.strip():
            return router.default_choice(REASON_NO_TEXT)
        timeout_s = router.config.embed_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready[router.alias].wait()
                vectors = await self._embedder.embed(
                    router.config.embedding_model, [text], ctx.classification,
                    onprem_only=ctx.principal is not None and ctx.principal.onprem_only,
                    priority=ctx.headers.priority)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a timeout, a full queue, an engine failure: route by default
            logger.warning("request %s: semantic route %r fell back to its default target: %s", ctx.request_id,
                           router.alias, type(exc).__name__)
            return router.default_choice(REASON_EMBEDDING_UNAVAILABLE)
        return router.choose(vectors[0])

    def _allowed(self, router: SemanticRouter, choice: RouteChoice, ctx: RequestContext) -> RouteChoice:
        data_class = ctx.classification.data_class
        onprem_only = ctx.principal is not None and ctx.principal.onprem_only

        def fits(model: str) -> bool:
            return self._trust[model] >= data_class and (self._onprem[model] or not onprem_only)

        if fits(choice.model):
            return choice
        fallback = router.config.targets[choice.target].confidential_fallback
        if fallback is not None and fits(fallback):
            return RouteChoice(choice.alias, choice.target, fallback, choice.score, choice.reason,
                               fallback_from=choice.model)
        why = "must stay on-prem" if onprem_only and self._trust[choice.model] >= data_class \
            else f"is classified {data_class.name}"
        raise ModelNotAllowed(
            f"'{router.alias}' routed this request to '{choice.target}' (model '{choice.model}'), which runs on no "
            f"site allowed to process it: the request {why}. Name an on-prem model, or configure "
            f"confidential_fallback for that target.", param="model")
