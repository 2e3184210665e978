"""The simulation: the router's real schedulers and policies over simulated engine replicas, in
virtual time.

What is real: ``build_targets`` and ``build_schedulers`` from the cluster's own config, so each
model gets the production ``ModelScheduler`` with its ``AdmissionQueue``, ``PlacementPipeline``
(filters, scorers, picker by name), ``SpillGate`` and spill predictor; requests ``acquire`` leases
and ``release`` them exactly as the router's admit stage and outcome do. What is simulated: the
engines (``EngineProfile``: time to first token from prefill speed, time per token from the
batch), and the load reports the router's fleet would read from them (sent at every change, as the
fleet's load watch does).

Cloud groups with ``autoscaling`` scale as in production: every ``REPORT_INTERVAL_S`` the
scheduler's own ``scale_demand`` goes through the operator's ``ScalePolicy`` (up at once, down after
``scale_down_idle_s``); a new replica serves ``provisioning_delay_s`` later (node and engine start),
an idle one leaves at once. Replica-seconds are counted per site, for the cost of hourly sites.

One router replica is simulated (its scheduler sees all traffic); the residency check counts any
request placed on a site not trusted with its data class (it must stay 0).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field

from serve_app.config import SiteKind, SpillwayConfig
from serve_app.errors import SpillwayError
from serve_app.governance.cost import CostModel
from serve_app.planner.profile import EngineProfile
from serve_app.ops.autoscale import REPORT_INTERVAL_S, ScalePolicy
from serve_app.planner.virtual_time import run_virtual
from serve_app.policy.classify import DataClass
from serve_app.policy.placement import RequestView
from serve_app.router.placement import build_schedulers, build_targets
from serve_app.router.scheduler import SPILL_REASON_NONE


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    model: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    data_class: DataClass = DataClass.public


@dataclass
class SimReplica:
    running: int = 0


@dataclass
class SimGroup:
    """A simulated engine deployment: its replicas and their profile; an autoscaled one also its
    scale policy, the replicas still starting, and replica-seconds so far."""

    profile: EngineProfile
    replicas: list[SimReplica]
    policy: ScalePolicy | None = None
    target: int = 0
    starting: int = 0
    replica_s: float = 0.0
    counted_at: float = 0.0

    def pick(self) -> SimReplica:
        return min(self.replicas, key=lambda replica: replica.running)

    def count(self, now: float) -> None:
        self.replica_s += (len(self.replicas) + self.starting) * (now - self.counted_at)
        self.counted_at = now

    @property
    def running(self) -> int:
        return sum(replica.running for replica in self.replicas)


@dataclass
class SimResult:
    ttft_ms: list[float] = field(default_factory=list)
    sites: Counter = field(default_factory=Counter)
    sites_by_class: Counter = field(default_factory=Counter)  # (data class name, site) -> requests
    spilled: int = 0
    rejected: Counter = field(default_factory=Counter)
    residency_violations: int = 0
    budget_misses: int = 0
    cost: float = 0.0
    cost_by_site: Counter = field(default_factory=Counter)
    replica_seconds: Counter = field(default_factory=Counter)  # per site (starting replicas included)
    scale_events: list = field(default_factory=list)  # (time s, group, replicas from, to)
    duration_s: float = 0.0
    events: int = 0

    def percentile(self, q: float) -> float | None:
        ordered = sorted(self.ttft_ms)
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    def summary(self, onprem_sites: set[str]) -> dict:
        served = sum(self.sites.values())
        onprem = sum(n for site, n in self.sites.items() if site in onprem_sites)
        return {
            "requests_served": served, "rejected": dict(self.rejected),
            "ttft_p50_ms": _round(self.percentile(50)), "ttft_p99_ms": _round(self.percentile(99)),
            "onprem_share": round(onprem / served, 4) if served else None,
            "spill_share": round(self.spilled / served, 4) if served else None,
            "sites": dict(self.sites), "budget_misses": self.budget_misses,
            "residency_violations": self.residency_violations,
            "cost_per_hour": round(self.cost * 3600 / self.duration_s, 4) if self.duration_s else None,
            "events": self.events,
        }


def _spawn(loop, tasks: set, coro) -> None:
    task = loop.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Simulation:
    """``profiles``: ``{(model, site): EngineProfile}`` for every (model, site) with replicas."""

    def __init__(self, config: SpillwayConfig, profiles: dict[tuple[str, str], EngineProfile],
                 provisioning_delay_s: float = 60.0):
        self.config = config
        self.profiles = profiles
        self.provisioning_delay_s = provisioning_delay_s
        self.onprem_sites = {s.name for s in config.sites if s.kind == SiteKind.onprem}
        self.schedulers: dict = {}  # the last run's (the production ModelScheduler per model)

    def run(self, requests: list[SimRequest]) -> SimResult:
        return run_virtual(lambda loop: self._run(loop, requests))

    async def _run(self, loop, requests: list[SimRequest]) -> SimResult:
        config = self.config
        wanted = {r.model for r in requests}  # (only the models the trace asks for need profiles)
        handles = {m.id: {site: None for site in m.replicas if m.deploys_on(site)
                          and config.site(site).kind != SiteKind.external} for m in config.models if m.id in wanted}
        targets = {m: t for m, t in build_targets(config, handles).items() if m in wanted}
        schedulers = self.schedulers = build_schedulers(config, targets, clock=loop.time)
        groups: dict[str, SimGroup] = {}
        for model_id, by_group in targets.items():
            for group_id, target in by_group.items():
                group = target.group
                profile = self.profiles[(model_id, group.site)]
                sim_group = groups[group_id] = SimGroup(profile, [SimReplica() for _ in range(group.replicas)])
                scaling = config.model(model_id).autoscaling.get(group.site)
                if scaling is not None:
                    count = config.model(model_id).replicas[group.site]
                    sim_group.replicas = [SimReplica() for _ in range(count)]
                    sim_group.policy, sim_group.target = ScalePolicy(scaling, group.max_num_seqs), count
                    schedulers[model_id].set_capacity(group_id, count * group.max_num_seqs)
        costs = CostModel(config)
        result = SimResult()
        start = loop.time()
        done = loop.create_future()
        remaining = len(requests)

        def report(model_id: str, group_id: str) -> None:
            group = groups[group_id]
            batch = max(1, group.running)
            schedulers[model_id].observe_engine_load(group_id, group.running, 0.0, group.profile.itl_at(batch),
                                                     group.profile.ttft_overhead_ms)
            result.events += 1

        async def serve(request: SimRequest, index: int) -> None:
            nonlocal remaining
            scheduler = schedulers[request.model]
            try:
                view = RequestView(f"sim-{index}", request.model, request.data_class)
                lease = await scheduler.acquire(view, max_tokens=request.max_tokens)
            except SpillwayError as exc:
                result.rejected[exc.code or str(exc.status)] += 1
            else:
                group_id = lease.group.group_id
                group = groups[group_id]
                if request.data_class > lease.group.trusted_up_to:
                    result.residency_violations += 1
                replica = group.pick()
                replica.running += 1
                report(request.model, group_id)
                await asyncio.sleep(group.profile.ttft_ms(request.prompt_tokens) / 1000)
                result.ttft_ms.append((loop.time() - request.arrival_s) * 1000)
                decode_s = max(0, request.output_tokens - 1) * group.profile.itl_at(max(1, group.running)) / 1000
                await asyncio.sleep(decode_s)
                replica.running -= 1
                lease.release()
                scheduler.observe_usage(request.max_tokens, request.output_tokens)
                report(request.model, group_id)
                result.sites[lease.group.site] += 1
                result.sites_by_class[(request.data_class.name, lease.group.site)] += 1
                result.spilled += lease.spill_reason != SPILL_REASON_NONE
                cost = costs.request_cost(request.model, lease.group.site, (request.prompt_tokens, request.output_tokens))
                result.cost += cost
                result.cost_by_site[lease.group.site] += cost
                result.events += 3
            remaining -= 1
            if remaining == 0 and not done.done():
                done.set_result(None)

        def replica_up(model_id: str, group_id: str) -> None:
            group = groups[group_id]
            group.count(loop.time())
            group.starting -= 1
            if len(group.replicas) >= group.target:
                return  # scaled down while it was starting: the start is cancelled
            group.replicas.append(SimReplica())
            schedulers[model_id].set_capacity(group_id, len(group.replicas) * targets[model_id][group_id].group.max_num_seqs)

        async def autoscale() -> None:
            scaled = [(m, g) for m, by_group in targets.items() for g in by_group if groups[g].policy is not None]
            while scaled:
                await asyncio.sleep(REPORT_INTERVAL_S)
                now = loop.time()
                for model_id, group_id in scaled:
                    group = groups[group_id]
                    demand = schedulers[model_id].scale_demand().get(group_id, 0)
                    target = group.policy.decide(group.target, demand, now)
                    if target != group.target:
                        result.scale_events.append((round(now, 1), group_id, group.target, target))
                    group.count(now)
                    for _ in range(target - len(group.replicas) - group.starting):
                        group.starting += 1
                        loop.call_later(self.provisioning_delay_s, replica_up, model_id, group_id)
                    idle = [r for r in group.replicas if r.running == 0]  # (busy ones leave once idle)
                    for replica in idle[:max(0, len(group.replicas) - target)]:
                        group.replicas.remove(replica)
                    group.target = target
                    max_num_seqs = targets[model_id][group_id].group.max_num_seqs
                    schedulers[model_id].set_capacity(group_id, len(group.replicas) * max_num_seqs)

        scaler = loop.create_task(autoscale())
        tasks: set[asyncio.Task] = set()
        for index, request in enumerate(requests):
            loop.call_at(start + request.arrival_s, _spawn, loop, tasks, serve(request, index))
        if requests:
            await done
        scaler.cancel()
        result.duration_s = max((r.arrival_s for r in requests), default=0.0) or 1.0
        for model_id, by_group in targets.items():
            for group_id, target in by_group.items():
                group = groups[group_id]
                if group.policy is None:
                    group.replica_s = len(group.replicas) * result.duration_s
                else:
                    group.count(loop.time())
                result.replica_seconds[target.group.site] += group.replica_s
        result.budget_misses = sum(s.budget_misses for s in schedulers.values())
        return result
