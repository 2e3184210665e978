"""The read-only half of the model scheduler: what its state says ahead of time.

When the preferred site's sequences free (``_free_at``), the queue in order with each request's
predicted service (``_waiting``), how long a request arriving now would wait for the preferred
site, how many sequences want each autoscaled group, and the scheduler's report. The spill scan
(``scheduler.py``), the router's status report and the cloud scaler (``ops/autoscale.py``) all read
the same predictions. Nothing here grants, spills or changes the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve_app.policy.spill import SiteSimulation
from serve_app.router.groups import EngineGroup, Speed

if TYPE_CHECKING:
    from serve_app.router.scheduler import Ticket


class SchedulerOutlook:
    """Mixed into ``ModelScheduler``, whose state (groups, speed, leases, queue, predictor) it reads."""

    def _preferred(self, fixed_only: bool = False) -> tuple[list[EngineGroup], Speed]:
        """The preferred site's groups with capacity (``fixed_only``: not autoscaled), and the speed
        the predictions use: the first of them's, or any group's when there is none."""
        preferred = [g for g in self.groups.values() if g.site_rank == 0 and self.capacity[g.group_id] > 0
                     and not (fixed_only and g.autoscaled)]
        return preferred, self.speed[preferred[0].group_id] if preferred else next(iter(self.speed.values()))

    def _waiting(self, speed: Speed):
        """The first ``max_scan`` live queued requests, in queue order, with their sequences and
        predicted service time: ``(queued, ticket, sequences, service_ms)``."""
        for queued in self.queue.ordered()[:self.spill.max_scan]:
            ticket: Ticket = queued.payload
            if not ticket.future.done():
                yield (queued, ticket, ticket.request.sequences,
                       speed.ttft_ms + ticket.expected_tokens * speed.itl_ms)

    def _free_at(self, now: float, groups: list[EngineGroup]) -> list[float]:
        """When each sequence of ``groups`` frees: our leases from their progress, other routers'
        sequences after half a typical service, free ones now. Sequences over capacity (routers
        overshooting between load polls) wait in the engine for the first that frees.

        Runs on every pump with a queue, over every lease: one pass of arithmetic per lease. A
        lease streaming tokens frees when its remaining tokens are out; any other frees
        ``ttft + expected_tokens x itl`` after it started (the tokens done so far follow from the
        time since the first token), and never sooner than one token from now."""
        times: list[float] = []
        for group in groups:
            speed = self.speed[group.group_id]
            itl_s, ttft_s = speed.itl_ms / 1000, speed.ttft_ms / 1000
            soonest = now + itl_s
            busy: list[float] = []
            for lease in self._leases[group.group_id]:
                if lease.first_token_at is None:
                    at = lease.acquired_at + ttft_s + lease.expected_tokens * itl_s
                elif lease.streaming:
                    at = now + (lease.expected_tokens - lease.tokens_out) * itl_s
                else:  # an answer that is not streamed: its first token was seen, its tokens were not
                    at = now + lease.expected_tokens * itl_s - max(0.0, now - lease.acquired_at - ttft_s)
                if at < soonest:
                    at = soonest
                if lease.sequences == 1:
                    busy.append(at)
                else:
                    busy.extend([at] * lease.sequences)
            typical_s = (speed.ttft_ms + self.expected_tokens(None) * speed.itl_ms) / 1000
            busy.extend([now + typical_s / 2] * self.others_in_flight[group.group_id])
            capacity = self.capacity[group.group_id]
            if len(busy) <= capacity:
                times += busy
                times += [now] * (capacity - len(busy))
                continue
            busy.sort()
            slots = busy[:capacity]
            for _ in busy[capacity:]:
                slots.sort()
                slots[0] += typical_s
            times += slots
        return times

    def predicted_preferred_wait_ms(self) -> float:
        """How long a request arriving now would wait for the preferred site (no spill assumed)."""
        now = self._clock()
        preferred, speed = self._preferred()
        if not preferred:
            return float("inf")
        simulation: SiteSimulation = self.predictor.simulate(now, self._free_at(now, preferred))
        for queued in self.queue.ordered()[:self.spill.max_scan]:
            ticket: Ticket = queued.payload
            simulation.take(ticket.request.sequences, speed.ttft_ms + ticket.expected_tokens * speed.itl_ms)
        return (simulation.start(1) - now) * 1000

    def scale_demand(self) -> dict[str, int]:
        """Sequences that want each autoscaled group (``ops/autoscale.py``): this router's sequences
        running there, plus queued ones that may run there and whose predicted start on the
        preferred site misses their TTFT budget (they would spill if the group had room), plus
        those that started on the preferred site since the last call after waiting past their
        budget while the group had no room (a cold burst's budget misses: between two calls the
        queue may be empty, and the pressure must not vanish with it)."""
        scaled = [g for g in self.groups.values() if g.autoscaled]
        if not scaled:
            return {}
        demand = {g.group_id: self.in_flight[g.group_id] + self._cold_misses.pop(g.group_id, 0) for g in scaled}
        if not len(self.queue):
            return demand
        now = self._clock()
        preferred, speed = self._preferred(fixed_only=True)
        simulation = self.predictor.simulate(now, self._free_at(now, preferred)) if preferred else None
        budget_s = self.spill.spill_after_ms / 1000
        for queued, ticket, sequences, service_ms in self._waiting(speed):
            target = next((g for g in scaled if ticket.request.data_class <= g.trusted_up_to
                           and g.group_id not in ticket.exclude), None)
            misses = simulation is None or simulation.start(sequences) > queued.enqueued_at + budget_s
            if target is not None and misses and (not ticket.pinned or simulation is None):
                demand[target.group_id] += sequences
            elif simulation is not None:
                simulation.take(sequences, service_ms)
        return demand

    def report(self) -> dict:
        return {
            "queued": len(self.queue),
            "spill_gate_open": self.gate.is_open,
            "spilled": dict(self.spilled),
            "spillable_admitted": self.spillable,
            "budget_misses": self.budget_misses,
            "completion_ratio": round(self.lengths.ratio, 3),
            "typical_output_tokens": round(self.lengths.typical, 1),
            "groups": {
                v.group_id: {"site": v.site, "capacity": v.capacity, "in_flight": v.in_flight,
                             "others_in_flight": self.others_in_flight[v.group_id], "healthy": v.healthy,
                             "itl_ms": round(self.speed[v.group_id].itl_ms, 2),
                             "ttft_ms": round(self.speed[v.group_id].ttft_ms, 1)}
                for v in self.views()
            },
        }
