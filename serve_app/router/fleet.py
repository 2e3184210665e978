"""The engine replicas as this router sees them: which exist, which are healthy, how loaded.

- Discovery: every ``DISCOVERY_INTERVAL_S`` the replica list is read from Ray's KV store in a
  worker thread and applied on the event loop (``GateDirectory.fetch`` / ``apply``).
- Health is per replica: a replica that failed a request (transport failure, dead engine) is
  held out for ``replica_cooldown_s``; its group keeps serving on its other replicas. A failure
  that names no replica (a Serve call that broke before answering) holds the whole group out.
- Capacity: a group runs ``max_num_seqs`` sequences per available replica; the schedulers get it
  whenever it changes (discovery, a cooldown starting or ending).
- Load: each known replica reports its sequences in flight (all routers'), KV-cache use and step
  times over its port, at once when sequences were released (a load watch) and at the latest
  every ``load_poll_interval_ms``; the schedulers fold them in.
- ``send`` dispatches one request: straight to the least loaded available replica, or through
  one Serve call when the router knows none (or all of them refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from serve_app.config import SpillwayConfig
from serve_app.router.placement import EngineTarget
from serve_app.router.scheduler import ModelScheduler
from serve_app.transport.base import EngineFull, EngineReply, EngineRequest, TransportError
from serve_app.transport.direct import GateDirectory, GateFull, GateUnavailable
from serve_app.transport.serve_call import ServeCallTransport

logger = logging.getLogger("spillway.router.fleet")

DISCOVERY_INTERVAL_S = 2.0
MIN_REPORT_GAP_S = 0.01  # a replica's load watch reports at most this often to one router


class Fleet:
    def __init__(self, config: SpillwayConfig, targets: dict[str, dict[str, EngineTarget]],
                 schedulers: dict[str, ModelScheduler], metrics=None, directory: GateDirectory | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._config = config
        self.targets = targets
        self._schedulers = schedulers
        self._metrics = metrics
        self._clock = clock
        self._cooldown_s = config.router.replica_cooldown_s
        self.directory = directory
        if directory is None and config.router.direct_dispatch:
            self.directory = GateDirectory(idle_timeout_s=config.engine_port.idle_timeout_s, clock=clock)
        if self.directory is not None:
            for target in self._all_targets():
                if target.external is None:
                    self.directory.watch(target.app, target.deployment)
        self.serve_call = ServeCallTransport(lambda: self.directory.secret if self.directory else None)
        self._group_down_until: dict[str, float] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        # Load watches per group, one per known replica, and each replica's latest report.
        self._watches: dict[str, dict[tuple, asyncio.Task]] = {}
        self._reports: dict[str, dict[tuple, dict]] = {}

    def _all_targets(self) -> list[EngineTarget]:
        return [t for by_group in self.targets.values() for t in by_group.values()]

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pollers on the running loop (idempotent: call it on every request)."""
        if self._tasks and not any(t.done() for t in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_load())]
        if self.directory is not None:
            self._tasks.append(loop.create_task(self._discover()))

    async def close(self) -> None:
        watches = [task for by_key in self._watches.values() for task in by_key.values()]
        for task in [*self._tasks, *self._background, *watches]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, *watches, return_exceptions=True)
        self._tasks, self._background, self._watches = [], set(), {}
        if self.directory is not None:
            self.directory.close()
        for transport in {id(t.external): t.external for t in self._all_targets() if t.external}.values():
            await transport.close()

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- health and capacity -------------------------------------------------------------------

    def cool_down(self, target: EngineTarget, replica: str | None) -> None:
        """Hold a failed replica out (the whole group when the failure names none)."""
        until = self._clock() + self._cooldown_s
        gate = None
        if replica is not None and self.directory is not None:
            gate = next((g for g in self.directory.gates(target.app, target.deployment) if g.replica == replica), None)
        if gate is not None:
            gate.down_until = until
        else:
            self._group_down_until[target.group.group_id] = until
        logger.warning("%s replica %s held out for %.0fs after a failure", target.group.group_id,
                       replica or "(unknown: whole group)", self._cooldown_s)
        self.update_capacity()
        try:
            # Woken a little after the cooldown: asyncio may run a timer early by its clock resolution.
            asyncio.get_running_loop().call_later(self._cooldown_s + 0.05, self.update_capacity)
        except RuntimeError:
            pass

    def capacity(self, target: EngineTarget) -> int:
        group, now = target.group, self._clock()
        if self._group_down_until.get(group.group_id, 0.0) > now:
            return 0
        if target.external is not None:
            return group.replicas * group.max_num_seqs
        gates = self.directory.gates(target.app, target.deployment) if self.directory is not None else []
        down = sum(1 for g in gates if not g.available(now))
        return max(0, max(len(gates), group.replicas) - down) * group.max_num_seqs

    def update_capacity(self) -> None:
        for model_id, by_group in self.targets.items():
            for target in by_group.values():
                self._schedulers[model_id].set_capacity(target.group.group_id, self.capacity(target))

    # ---- dispatch ------------------------------------------------------------------------------

    async def send(self, target: EngineTarget, request: EngineRequest, timeout_s: float) -> EngineReply:
        """Raises ``TransportError`` (naming the replica when known) when the request failed before
        anything reached the client, ``EngineFull`` when every replica tried is full."""
        if target.external is not None:
            return await target.external.send(request, target.group.model)
        refused: set[str] = set()
        full = False
        while self.directory is not None:
            gate = self.directory.pick(target.app, target.deployment, skip=frozenset(refused))
            if gate is None:
                break
            try:
                reply = await gate.request(target.deployment, request, timeout_s)
            except GateFull:
                refused.add(gate.replica)
                full = True
                continue
            except GateUnavailable as exc:
                logger.info("request %s: %s refused (%s); trying another way", request.request_id, gate.replica, exc)
                refused.add(gate.replica)
                if exc.gone:
                    entries = self.directory.forget(target.app, target.deployment, gate)
                    self._in_background(asyncio.to_thread(self.directory.remove, entries))
                    self.update_capacity()
                continue
            self.directory.direct += 1
            return reply
        if full:
            raise EngineFull(f"{target.group.group_id}: every replica is full")
        if target.group.autoscaled:
            # (no Serve call: Serve would start a replica for it, against the cloud scaler's count)
            raise TransportError(f"{target.group.group_id}: no replica can be reached directly")
        if self.directory is not None:
            self.directory.fallback += 1
        return await self.serve_call.send(target.handle, request, timeout_s)

    # ---- background ----------------------------------------------------------------------------

    async def _discover(self) -> None:
        while True:
            snapshot = await asyncio.to_thread(self.directory.fetch)
            stale = self.directory.apply(snapshot)
            if stale:
                await asyncio.to_thread(self.directory.remove, stale)
            self.update_capacity()
            await asyncio.sleep(DISCOVERY_INTERVAL_S)

    async def _poll_load(self) -> None:
        """Keep a load watch on every known replica (``_watch``); poll through Serve the groups
        whose replicas this router does not know yet."""
        interval_s = self._config.router.load_poll_interval_ms / 1000
        timeout_s = max(1.0, 4 * interval_s)
        while True:
            unwatched = self._reconcile_watches(interval_s, timeout_s)
            await asyncio.gather(*(self._poll_group(model_id, target, timeout_s) for model_id, target in unwatched))
            if self._metrics is not None:
                for model_id, scheduler in self._schedulers.items():
                    self._metrics.queue(model_id, len(scheduler.queue))
            await asyncio.sleep(interval_s)

    def _reconcile_watches(self, interval_s: float, timeout_s: float) -> list[tuple[str, EngineTarget]]:
        """One watch task per known replica: start the missing ones, stop those of replicas that
        left (and forget their figures). Returns the groups with no replica known."""
        unwatched = []
        for model_id, by_group in self.targets.items():
            for target in by_group.values():
                if target.external is not None:
                    continue  # (the router counts an external site's requests itself: its own leases)
                group_id = target.group.group_id
                gates = (self.directory.gates(target.app, target.deployment)
                         if self.directory is not None and self.directory.secret is not None else [])
                if not gates and not target.group.autoscaled:
                    # (an autoscaled group without known replicas has none, or none ready: a Serve
                    # call would wait for one instead of answering)
                    unwatched.append((model_id, target))
                watches = self._watches.setdefault(group_id, {})
                reports = self._reports.setdefault(group_id, {})
                live = {(g.replica, g.host, g.port): g for g in gates}
                for key in [k for k in watches if k not in live]:
                    watches.pop(key).cancel()
                    if reports.pop(key, None) is not None and reports:
                        self._apply(model_id, target, list(reports.values()))
                for key, gate in live.items():
                    if key not in watches or watches[key].done():
                        watches[key] = asyncio.get_running_loop().create_task(
                            self._watch(model_id, target, gate, key, interval_s, timeout_s))
        return unwatched

    async def _watch(self, model_id: str, target: EngineTarget, gate, key: tuple, interval_s: float,
                     timeout_s: float) -> None:
        """One replica's load, as soon as it changes: the engine answers a watch once sequences
        were released since the ``releases`` count of its last report (another router's request
        ended), and at the latest after ``interval_s``. A router that waits for room hears of
        other routers' releases at once, not at its next poll; at most one report per
        ``MIN_REPORT_GAP_S`` per replica."""
        reports = self._reports.setdefault(target.group.group_id, {})
        after: int | None = None
        while True:
            asked_at = time.monotonic()
            try:
                report = await gate.stats(timeout_s, after=after, wait_s=interval_s if after is not None else 0.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an engine that does not answer keeps its last figures
                after = None
                await asyncio.sleep(interval_s)
                continue
            reports[key] = report
            self._apply(model_id, target, list(reports.values()))
            releases = report.get("releases")
            # An engine that cannot wait (no count, or the same count at once) is polled instead.
            waited = after is not None and releases == after and time.monotonic() - asked_at < interval_s / 2
            after = releases if isinstance(releases, int) else None
            await asyncio.sleep(interval_s if after is None or waited else MIN_REPORT_GAP_S)

    async def _poll_group(self, model_id: str, target: EngineTarget, timeout_s: float) -> None:
        """No replica of the group is known: one replica answers through Serve, scaled to the group."""
        try:
            async with asyncio.timeout(timeout_s):
                report = await target.handle.stats.remote()
        except Exception:  # noqa: BLE001 - an engine that does not answer keeps its last figures
            return
        self._apply(model_id, target, [report], scale=target.group.replicas)

    def _apply(self, model_id: str, target: EngineTarget, reports: list[dict], scale: int = 1) -> None:
        sequences = scale * sum(int(r.get("sequences", r.get("in_flight", 0))) for r in reports)
        kv = max(float(r.get("kv_cache_usage", 0.0)) for r in reports)
        itl = _mean(r.get("itl_ms") for r in reports)
        ttft = _mean(r.get("ttft_ms") for r in reports)
        self._schedulers[model_id].observe_engine_load(target.group.group_id, sequences, kv, itl, ttft)
        if self._metrics is not None:
            self._metrics.engine_load(model_id, target.group.site, kv, sequences)

    # ---- reports -------------------------------------------------------------------------------

    async def engine_report(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Each engine group's health and live load, for /health (one replica per group answers)."""
        async def probe(target: EngineTarget) -> dict[str, Any]:
            if target.external is not None:
                # (no call to a paid API per health check: healthy unless held out after failures)
                down = self._group_down_until.get(target.group.group_id, 0.0) > self._clock()
                return {"healthy": not down, "kind": "external", "model": target.group.model,
                        "site": target.group.site, "failures": target.external.failures,
                        "max_concurrency": target.external.endpoint.max_concurrency}
            if target.group.autoscaled:
                return await probe_autoscaled(target)
            try:
                async with asyncio.timeout(timeout_s):
                    stats = await target.handle.stats.remote()
                return {"healthy": not stats.get("engine_dead"), **stats}
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy for this probe
                return {"healthy": False, "error": type(exc).__name__}

        async def probe_autoscaled(target: EngineTarget) -> dict[str, Any]:
            # Never through Serve: a handle call to a deployment at zero waits for a replica, and
            # Serve's autoscaler starts one for any request it sees ("cold start"), overriding the
            # cloud scaler. Scaled to zero is a healthy state: demand scales it up.
            gates = self.directory.gates(target.app, target.deployment) if self.directory is not None else []
            if not gates:
                return {"healthy": True, "replicas": 0, "scaled_to_zero": True}
            try:
                stats = await gates[0].stats(timeout_s)
                return {"healthy": not stats.get("engine_dead"), "replicas": len(gates), **stats}
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy for this probe
                return {"healthy": False, "replicas": len(gates), "error": type(exc).__name__}

        report: dict[str, dict[str, Any]] = {}
        for model_id, by_group in self.targets.items():
            targets = list(by_group.values())
            results = await asyncio.gather(*(probe(t) for t in targets))
            report[model_id] = {t.group.site: r for t, r in zip(targets, results)}
        return report

    def _known_replicas(self, target: EngineTarget) -> int:
        return len(self.directory.gates(target.app, target.deployment)) if self.directory is not None else 0

    def report(self) -> dict[str, Any] | None:
        return self.directory.report() if self.directory is not None else None


def _mean(values) -> float | None:
    present = [float(v) for v in values if v]
    return sum(present) / len(present) if present else None
