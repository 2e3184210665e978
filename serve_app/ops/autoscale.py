"""Cloud capacity from zero: cloud engine replicas follow the routers' spill pressure.

Serve's own autoscaler counts the requests that pass through Serve handles. Spillway's routers send
requests straight to engine replicas, and whether a request wants the cloud is a router decision (it
would miss its TTFT budget on-prem), so the signal comes from the routers:

- every router replica reports, every ``REPORT_INTERVAL_S``, for each autoscaled deployment, the
  sequences that want it (``ModelScheduler.scale_demand``): its own sequences running there, plus
  queued spillable sequences predicted to miss their budget on the preferred site;
- the ``CloudScaler`` (one replica) sums the fresh reports (a router silent for ``REPORT_STALE_S``
  counts for nothing: a dead router's demand goes with it) and ``ScalePolicy`` turns the sum into a
  replica count: up at once, down only after ``scale_down_idle_s`` of lower demand, within
  ``min_replicas``..``max_replicas``;
- it publishes the count in Ray's KV store, and Serve's autoscaler applies it: each autoscaled
  deployment runs ``follow_cloud_scaler`` as its autoscaling policy, with Serve's own delays off
  (``cloud_autoscaling``) and the site's bounds as Serve's. So ``serve status``, the dashboard and
  ``serve deploy`` see an ordinary autoscaling deployment, whose replicas start at 0. A replica
  that fits no node waits for Ray's autoscaler to add a node of its site (``cluster_configs/ray/``),
  and the router starts sending to it once its engine has registered its port.

On-prem deployments are never scaled: their hardware is paid for whether it is busy or not.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from serve_app.config import AutoscalingConfig, SpillwayConfig

logger = logging.getLogger("spillway.autoscale")

REPORT_INTERVAL_S = 1.0   # routers report their demand this often
REPORT_STALE_S = 5.0      # a report older than this counts for nothing
HISTORY_LEN = 512         # scaling events kept for `status`

POLICY_READ_EVERY_S = 0.5  # Serve's policy reads the scaler's target at most this often
SCALE_KV_NAMESPACE = "spillway_scale"

SetReplicas = Callable[[str, int], Awaitable[None]]


def scale_key(app: str, deployment: str) -> str:
    return f"{app}/{deployment}"


def cloud_autoscaling(params: AutoscalingConfig, initial_replicas: int) -> dict[str, Any]:
    """Serve's autoscaling config for an autoscaled deployment: the site's bounds, Serve's delays
    off (``ScalePolicy`` has its own hysteresis) and the policy that follows the cloud scaler."""
    return {
        "min_replicas": params.min_replicas,
        "max_replicas": params.max_replicas,
        "initial_replicas": initial_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "policy": {"policy_function": f"{__name__}:follow_cloud_scaler"},
    }


def follow_cloud_scaler(ctx) -> tuple[int, dict]:
    """Serve autoscaling policy (runs in Serve's controller): the replica count the cloud scaler
    published for this deployment; the current target until it published one. Serve's request
    counts are not used: routers send requests straight to the replicas."""
    from ray.experimental.internal_kv import _internal_kv_get

    state = dict(ctx.policy_state or {})
    now = time.monotonic()
    if now - state.get("spillway_read_at", 0.0) >= POLICY_READ_EVERY_S:
        state["spillway_read_at"] = now
        try:
            value = _internal_kv_get(scale_key(ctx.app_name, ctx.deployment_name), namespace=SCALE_KV_NAMESPACE)
        except Exception:  # noqa: BLE001 - keep the last target; the next read may work
            value = None
        if value is not None:
            state["spillway_target"] = int(value)
    return state.get("spillway_target", ctx.target_num_replicas), state


def publish_target(app: str, deployment: str, replicas: int) -> None:
    """Blocking GCS call: run it off the event loop."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(scale_key(app, deployment), str(int(replicas)).encode(), overwrite=True,
                     namespace=SCALE_KV_NAMESPACE)


@dataclass
class ScalePolicy:
    """Replicas for one deployment from the sequences that want it. Pure: the caller passes ``now``."""

    params: AutoscalingConfig
    slots_per_replica: int
    _low_since: float | None = field(default=None, repr=False)
    _low_peak: int = field(default=0, repr=False)

    def wanted(self, demand: int) -> int:
        per_replica = max(1, math.floor(self.slots_per_replica * self.params.target_utilisation))
        return min(self.params.max_replicas, max(self.params.min_replicas, math.ceil(max(0, demand) / per_replica)))

    def decide(self, current: int, demand: int, now: float) -> int:
        """Up at once; down to the most wanted during the last ``scale_down_idle_s``, once that
        whole period wanted fewer replicas than ``current``."""
        wanted = self.wanted(demand)
        if wanted >= current:
            self._low_since = None
            return wanted
        if self._low_since is None:
            self._low_since, self._low_peak = now, wanted
        self._low_peak = max(self._low_peak, wanted)
        if now - self._low_since >= self.params.scale_down_idle_s:
            target = self._low_peak
            self._low_since, self._low_peak = now, wanted  # a step down starts the next period
            return target
        return current


@dataclass(frozen=True)
class ScaleEvent:
    at: float          # wall-clock seconds
    deployment: str
    replicas_from: int | None
    replicas_to: int
    demand: int

    def as_dict(self) -> dict:
        return {"at": round(self.at, 3), "deployment": self.deployment, "from": self.replicas_from,
                "to": self.replicas_to, "demand": self.demand}


class CloudScaler:
    """Sums the routers' demand and sets the replica counts of autoscaled deployments.

    ``set_replicas(deployment, n)`` applies a count (Serve's controller in a cluster, a fake in unit
    tests); ``clock`` is monotonic seconds. The operator calls ``tick`` every second."""

    def __init__(self, config: SpillwayConfig, set_replicas: SetReplicas, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        from serve_app.app import deployment_name

        self._set_replicas = set_replicas
        self._clock = clock
        self._wall_clock = wall_clock
        self.policies: dict[str, ScalePolicy] = {}
        self.targets: dict[str, int | None] = {}  # None: not set since this scaler started
        for model in config.models:
            for site, params in model.autoscaling.items():
                name = deployment_name(model.id, site)
                self.policies[name] = ScalePolicy(params, model.engine.max_num_seqs)
                self.targets[name] = None
        self._reports: dict[str, tuple[float, dict[str, int]]] = {}
        self._started_at = clock()
        self.history: deque[ScaleEvent] = deque(maxlen=HISTORY_LEN)
        self.last_demand: dict[str, int] = {}
        self.errors = 0

    def report(self, router: str, demand: dict[str, int]) -> None:
        """One router's demand (sequences per deployment), replacing its previous report."""
        self._reports[router] = (self._clock(), {name: int(n) for name, n in demand.items() if name in self.policies})

    def demand(self, now: float) -> dict[str, int]:
        for router in [r for r, (at, _) in self._reports.items() if now - at > REPORT_STALE_S]:
            del self._reports[router]  # a router that stopped reporting (it died) wants nothing
        total = dict.fromkeys(self.policies, 0)
        for _, by_deployment in self._reports.values():
            for name, sequences in by_deployment.items():
                total[name] += sequences
        return total

    async def tick(self) -> None:
        now = self._clock()
        if now - self._started_at < REPORT_INTERVAL_S * 2 and any(t is None for t in self.targets.values()):
            return  # let every live router report once before the first decision (after a restart)
        demand = self.demand(now)
        self.last_demand = demand
        for name, policy in self.policies.items():
            current = self.targets[name]
            target = policy.decide(current if current is not None else policy.wanted(demand[name]), demand[name], now)
            if target == current:
                continue
            try:
                await self._set_replicas(name, target)
            except Exception as exc:  # noqa: BLE001 - logged and retried on the next tick
                self.errors += 1
                logger.error("could not set %s to %d replicas: %s", name, target, exc)
                continue
            self.history.append(ScaleEvent(self._wall_clock(), name, current, target, demand[name]))
            logger.info("%s: %s -> %d replicas (demand %d sequences)", name, current, target, demand[name])
            self.targets[name] = target

    def status(self) -> dict[str, Any]:
        return {
            "deployments": {name: {"replicas": self.targets[name], "demand": self.last_demand.get(name, 0),
                                   "min_replicas": p.params.min_replicas, "max_replicas": p.params.max_replicas}
                            for name, p in self.policies.items()},
            "routers_reporting": len(self._reports),
            "errors": self.errors,
            "history": [event.as_dict() for event in self.history],
        }
