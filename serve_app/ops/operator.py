"""The operator: one replica per app, beside the ledger, for the decisions that need every
router's view. It runs the cloud scaler (``ops/autoscale.py``) when any deployment autoscales, and
progressive rollouts (``ops/rollout.py``).

Routers report to it every second (``report``): their scale demand and their per-variant
counters. It publishes what it decides in Ray's KV store (replica targets for Serve's autoscaling
policy, split weights for the routers), so nothing it decides is lost with its replica: a restarted
operator finds the published weights still in force, and the routers keep applying them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

from serve_app.config import SpillwayConfig
from serve_app.errors import InvalidRequest, NotFound, SpillwayError
from serve_app.ops.autoscale import CloudScaler, publish_target
from serve_app.ops.rollout import RUNNING, SPLIT_KV_NAMESPACE, Counts, Rollout, RolloutSpec, split_key

logger = logging.getLogger("spillway.operator")

TICK_S = 1.0
REPORT_STALE_S = 30.0  # a router silent this long no longer counts in rollout windows

PublishSplit = Callable[[str, dict[str, float]], Awaitable[None]]


class Operator:
    def __init__(self, config: SpillwayConfig, publish_split: PublishSplit,
                 set_replicas: Callable[[str, int], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._publish_split = publish_split
        self._clock = clock
        self.scaler = CloudScaler(config, set_replicas, clock=clock) if config.autoscaled and set_replicas else None
        self.rollouts: dict[str, Rollout] = {}
        self._counts: dict[str, tuple[float, dict[str, dict[str, Counts]]]] = {}  # router -> (at, alias -> variant)

    # ---- reports from routers -------------------------------------------------------------------

    def report(self, router: str, demand: dict[str, int], splits: dict[str, dict[str, dict]]) -> None:
        if self.scaler is not None:
            self.scaler.report(router, demand)
        self._counts[router] = (self._clock(), {alias: {variant: Counts.of(raw) for variant, raw in variants.items()}
                                                for alias, variants in splits.items()})

    def _routers(self, alias: str) -> dict[str, dict[str, Counts]]:
        now = self._clock()
        return {router: by_alias.get(alias, {}) for router, (at, by_alias) in self._counts.items()
                if now - at <= REPORT_STALE_S}

    # ---- rollouts -------------------------------------------------------------------------------

    async def start_rollout(self, spec: RolloutSpec) -> dict[str, Any]:
        model_ids = {m.id for m in self.config.models}
        missing = [m for m in (spec.stable, spec.canary) if m not in model_ids]
        if missing:
            raise NotFound(f"rollout: unknown model(s) {missing}; known: {sorted(model_ids)}")
        if spec.alias in model_ids:
            raise InvalidRequest(f"rollout: alias {spec.alias!r} is a model id; pick another name", param="alias")
        current = self.rollouts.get(spec.alias)
        if current is not None and current.state == RUNNING:
            raise InvalidRequest(f"a rollout of {spec.alias!r} is running; abort it first", param="alias")
        rollout = Rollout(spec, started_at=self._clock())
        rollout.begin(self._routers(spec.alias))
        self.rollouts[spec.alias] = rollout
        await self._publish_split(spec.alias, rollout.weights())
        logger.info("rollout of %s: %s -> %s started at %s%%", spec.alias, spec.stable, spec.canary, rollout.share)
        return rollout.status(self._clock())

    async def abort_rollout(self, alias: str) -> dict[str, Any]:
        rollout = self.rollouts.get(alias)
        if rollout is None:
            raise NotFound(f"no rollout of {alias!r}")
        if rollout.state == RUNNING:
            rollout.abort(self._clock())
            await self._publish_split(alias, rollout.weights())
        return rollout.status(self._clock())

    def rollout_status(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [r.status(now) for r in self.rollouts.values()]

    # ---- the loop -------------------------------------------------------------------------------

    async def tick(self) -> None:
        if self.scaler is not None:
            await self.scaler.tick()
        now = self._clock()
        for alias, rollout in list(self.rollouts.items()):
            if rollout.state != RUNNING:
                continue
            if rollout.advance(now, self._routers(alias)):
                logger.warning("rollout of %s: %s", alias, rollout.history[-1]["event"])
                await self._publish_split(alias, rollout.weights())

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick
                logger.exception("operator tick failed")
            await asyncio.sleep(TICK_S)


def publish_split(app: str, alias: str, weights: dict[str, float]) -> None:
    """Blocking GCS call: run it off the event loop."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(split_key(app, alias), json.dumps({"weights": weights}).encode(), overwrite=True,
                     namespace=SPLIT_KV_NAMESPACE)


def read_splits(app: str) -> dict[str, dict[str, float]]:
    """Every published split override of ``app``: ``{alias: {model: weight}}``. Blocking."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    prefix = split_key(app, "")
    overrides = {}
    for key in _internal_kv_list(prefix, namespace=SPLIT_KV_NAMESPACE) or []:
        value = _internal_kv_get(key, namespace=SPLIT_KV_NAMESPACE)
        if value is None:
            continue
        try:
            weights = json.loads(value)["weights"]
        except (ValueError, KeyError, TypeError):
            continue
        overrides[key.decode()[len(prefix):]] = {str(m): float(w) for m, w in weights.items()}
    return overrides


class OperatorDeployment:
    """The Serve deployment around ``Operator`` (one replica, on the router's site)."""

    async def __init__(self, config: dict):
        from ray import serve

        app = serve.get_replica_context().app_name

        async def set_replicas(deployment: str, replicas: int) -> None:
            await asyncio.to_thread(publish_target, app, deployment, replicas)

        async def publish(alias: str, weights: dict[str, float]) -> None:
            await asyncio.to_thread(publish_split, app, alias, weights)

        self.operator = Operator(SpillwayConfig.model_validate(config), publish, set_replicas)
        self._task = asyncio.get_running_loop().create_task(self.operator.run())

    async def report(self, router: str, demand: dict[str, int], splits: dict | None = None) -> None:
        self.operator.report(router, demand, splits or {})

    async def scale_status(self) -> dict[str, Any]:
        return self.operator.scaler.status() if self.operator.scaler is not None else {"deployments": {}}

    async def rollout(self, action: str, body: dict | None = None) -> Any:
        """``start`` (body: a RolloutSpec), ``abort`` (body: {alias}), ``status``. A refusal comes
        back as ``{"error": {kind, message, param}}``; the router's admin API raises it again."""
        try:
            if action == "start":
                return await self.operator.start_rollout(RolloutSpec.model_validate(body or {}))
            if action == "abort":
                return await self.operator.abort_rollout(str((body or {}).get("alias", "")))
            return self.operator.rollout_status()
        except SpillwayError as exc:  # crosses the actor boundary as data, raised again by the router
            return {"error": {"kind": type(exc).__name__, "message": str(exc), "param": getattr(exc, "param", None)}}

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("the operator loop stopped")

    async def __del__(self):
        self._task.cancel()
