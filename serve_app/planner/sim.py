"""The simulation: the router's real schedulers and policies over simulated engine replicas, in
virtual time.

What is real: ``build_targets`` and ``build_schedulers`` from the cluster's own config, so each
model gets the production ``ModelScheduler`` with its ``AdmissionQueue``, ``PlacementPipeline``
(filters, scorers, picker by name), ``SpillGate`` and spill predictor; requests ``acquire`` leases
and ``release`` them exactly as the router's admit stage and outcome do. What is simulated: the
engines (``EngineProfile``: time to first token from prefill speed and the replica's batch, time
per token from the batch), and the load reports the router's fleet would read from them (sent
when a sequence finishes, as the fleet's load watch answers when an engine's release count moves).

Cloud groups with ``autoscaling`` scale as in production: every ``REPORT_INTERVAL_S`` the
scheduler's own ``scale_demand`` goes through the operator's ``ScalePolicy`` (up at once, down after
``scale_down_idle_s``); a new replica serves ``provisioning_delay_s`` later (node and engine start),
an idle one leaves at once. Replica-seconds are counted per site, for the cost of hourly sites.

Every router replica of the config is simulated (``router.replicas``), each with its own
schedulers, as in production: arrivals go round-robin (the ingress's balancing), every router sees
the engines' load reports (what is not its own is other routers'), and the cloud scaler sums their
demand. The residency check counts any request placed on a site not trusted with its data class (it
must stay 0).
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


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    model: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    data_class: DataClass = DataClass.public


class SimGroup:
    """A simulated engine deployment: its replicas and their profile; an autoscaled one also its
    scale policy, the replicas still starting, and replica-seconds so far.

    A request goes to a least-loaded replica (as the router's direct dispatch does); the replicas
    are kept in buckets by sequences running, so choosing one costs the same for 1 replica or 1,000."""

    def __init__(self, profile: EngineProfile, replicas: int, max_num_seqs: int):
        self.profile = profile
        self.max_num_seqs = max_num_seqs
        self.policy: ScalePolicy | None = None
        self.target = 0
        self.starting = 0
        self.replica_s = 0.0
        self.counted_at = 0.0
        self.running = 0  # sequences on all replicas
        self._load: dict[int, int] = {}  # replica -> sequences
        self._levels: list[set[int]] = [set()]  # sequences -> replicas running that many
        self._lowest = 0
        self._next_id = 0
        for _ in range(replicas):
            self.add()

    @property
    def replicas(self) -> int:
        return len(self._load)

    @property
    def capacity(self) -> int:
        return self.replicas * self.max_num_seqs

    def add(self) -> None:
        self._load[self._next_id] = 0
        self._levels[0].add(self._next_id)
        self._next_id += 1
        self._lowest = 0

    def remove_idle(self, count: int) -> None:
        """Up to ``count`` idle replicas leave (busy ones stay until idle)."""
        idle = self._levels[0]
        for _ in range(min(count, len(idle))):
            del self._load[idle.pop()]

    def start(self) -> tuple[int, int]:
        """A sequence starts on a least-loaded replica: (that replica, its sequences now)."""
        level = self._lowest
        while not self._levels[level]:
            level += 1
        replica = self._levels[level].pop()
        if level + 1 == len(self._levels):
            self._levels.append(set())
        self._levels[level + 1].add(replica)
        self._load[replica] = level + 1
        self._lowest = level
        self.running += 1
        return replica, level + 1

    def finish(self, replica: int) -> None:
        level = self._load[replica]
        self._levels[level].discard(replica)
        self._levels[level - 1].add(replica)
        self._load[replica] = level - 1
        self._lowest = min(self._lowest, level - 1)
        self.running -= 1

    def mean_batch(self) -> int:
        return max(1, -(-self.running // max(1, self.replicas)))

    def count(self, now: float) -> None:
        self.replica_s += (self.replicas + self.starting) * (now - self.counted_at)
        self.counted_at = now


@dataclass
class SimResult:
    ttft_ms: list[float | None] = field(default_factory=list)  # by request (trace order); None: not served
    queue_ms: list[float | None] = field(default_factory=list)  # by request: its wait in the router's queue
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

    def percentile(self, q: float, indices=None) -> float | None:
        """TTFT percentile over the served requests (or over those of ``indices`` that were served)."""
        values = self.ttft_ms if indices is None else (self.ttft_ms[i] for i in indices)
        return percentile([v for v in values if v is not None], q)

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


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


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
        routers = [build_schedulers(config, targets, clock=loop.time) for _ in range(config.router.replicas)]
        self.schedulers = routers[0]  # (the first router's: the tests look at it)

        def set_capacity(model_id: str, group_id: str, capacity: int) -> None:
            for router in routers:
                router[model_id].set_capacity(group_id, capacity)

        groups: dict[str, SimGroup] = {}
        for model_id, by_group in targets.items():
            for group_id, target in by_group.items():
                group = target.group
                profile = self.profiles[(model_id, group.site)]
                scaling = config.model(model_id).autoscaling.get(group.site)
                count = config.model(model_id).replicas[group.site] if scaling is not None else group.replicas
                sim_group = groups[group_id] = SimGroup(profile, count, group.max_num_seqs)
                if scaling is not None:
                    sim_group.policy, sim_group.target = ScalePolicy(scaling, group.max_num_seqs), count
                    set_capacity(model_id, group_id, sim_group.capacity)
        costs = CostModel(config)
        result = SimResult(ttft_ms=[None] * len(requests), queue_ms=[None] * len(requests))
        start = loop.time()
        done = loop.create_future()
        remaining = len(requests)

        def report(model_id: str, group_id: str, group: SimGroup) -> None:
            batch = group.mean_batch()  # (what the engines' own metrics would say: their step times now)
            itl, ttft = group.profile.itl_at(batch), group.profile.ttft_ms(0, batch)
            for router in routers:
                router[model_id].observe_engine_load(group_id, group.running, 0.0, itl, ttft)
            result.events += 1

        def finished() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not done.done():
                done.set_result(None)

        # Arrivals are fed one at a time (not millions of timers up front), in time order.
        order = range(len(requests))
        if any(requests[i].arrival_s > requests[i + 1].arrival_s for i in range(len(requests) - 1)):
            order = sorted(order, key=lambda i: requests[i].arrival_s)

        def arrive(position: int) -> None:
            index = order[position]
            request = requests[index]
            result.events += 1
            if position + 1 < len(order):
                loop.call_at(start + requests[order[position + 1]].arrival_s, arrive, position + 1)
            # As the router's admit stage: ``acquire`` grants at once when it can (its synchronous
            # part, ``try_acquire``); only a request that must wait becomes a task.
            scheduler = routers[index % len(routers)][request.model]  # (round-robin over the routers)
            view = RequestView(f"sim-{index}", request.model, request.data_class)
            try:
                lease = scheduler.try_acquire(view, max_tokens=request.max_tokens)
            except SpillwayError as exc:
                result.rejected[exc.code or str(exc.status)] += 1
                finished()
                return
            if lease is None:
                loop.create_task(admit(request, index, scheduler, view))
            else:
                started(request, index, scheduler, lease)

        async def admit(request: SimRequest, index: int, scheduler, view: RequestView) -> None:
            try:
                lease = await scheduler.acquire(view, max_tokens=request.max_tokens)
            except SpillwayError as exc:
                result.rejected[exc.code or str(exc.status)] += 1
                finished()
                return
            started(request, index, scheduler, lease)

        def started(request: SimRequest, index: int, scheduler, lease) -> None:
            group_id = lease.group.group_id
            group = groups[group_id]
            result.queue_ms[index] = lease.queue_ms
            if request.data_class > lease.group.trusted_up_to:
                result.residency_violations += 1
            replica, batch = group.start()
            # The first token and the last follow from the profile and the batch at the start: the
            # first token changes nothing the router sees, so it is counted here, not scheduled.
            ttft_ms = group.profile.ttft_ms(request.prompt_tokens, batch)
            result.ttft_ms[index] = (loop.time() - start - request.arrival_s) * 1000 + ttft_ms
            result.events += 1
            decode_s = max(0, request.output_tokens - 1) * group.profile.itl_at(batch) / 1000
            loop.call_later(ttft_ms / 1000 + decode_s, complete, request, scheduler, lease, group, replica)

        def complete(request: SimRequest, scheduler, lease, group: SimGroup, replica: int) -> None:
            site = lease.group.site
            group.finish(replica)
            lease.release()
            scheduler.observe_usage(request.max_tokens, request.output_tokens)
            report(request.model, lease.group.group_id, group)
            result.sites[site] += 1
            result.sites_by_class[(request.data_class.name, site)] += 1
            result.spilled += lease.spill_reason != SPILL_REASON_NONE
            cost = costs.request_cost(request.model, site, (request.prompt_tokens, request.output_tokens))
            result.cost += cost
            result.cost_by_site[site] += cost
            result.events += 1
            finished()

        def replica_up(model_id: str, group_id: str) -> None:
            group = groups[group_id]
            group.count(loop.time())
            group.starting -= 1
            if group.replicas >= group.target:
                return  # scaled down while it was starting: the start is cancelled
            group.add()
            set_capacity(model_id, group_id, group.capacity)

        async def autoscale() -> None:
            scaled = [(m, g) for m, by_group in targets.items() for g in by_group if groups[g].policy is not None]
            while scaled:
                await asyncio.sleep(REPORT_INTERVAL_S)
                now = loop.time()
                for model_id, group_id in scaled:
                    group = groups[group_id]
                    demand = sum(router[model_id].scale_demand().get(group_id, 0) for router in routers)
                    target = group.policy.decide(group.target, demand, now)
                    if target != group.target:
                        result.scale_events.append((round(now, 1), group_id, group.target, target))
                    group.count(now)
                    for _ in range(target - group.replicas - group.starting):
                        group.starting += 1
                        loop.call_later(self.provisioning_delay_s, replica_up, model_id, group_id)
                    group.remove_idle(group.replicas - target)
                    group.target = target
                    set_capacity(model_id, group_id, group.capacity)

        scaler = loop.create_task(autoscale())
        if requests:
            loop.call_at(start + requests[order[0]].arrival_s, arrive, 0)
            await done
        scaler.cancel()
        result.duration_s = max((r.arrival_s for r in requests), default=0.0) or 1.0
        for model_id, by_group in targets.items():
            for group_id, target in by_group.items():
                group = groups[group_id]
                if group.policy is None:
                    group.replica_s = group.replicas * result.duration_s
                else:
                    group.count(loop.time())
                result.replica_seconds[target.group.site] += group.replica_s
        result.budget_misses = sum(s.budget_misses for router in routers for s in router.values())
        return result
