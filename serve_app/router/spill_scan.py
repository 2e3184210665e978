"""The spill scan: which queued requests leave the preferred site now, and when to look again.

Mixed into ``ModelScheduler`` (``scheduler.py``), whose queue, leases, views and grants it uses;
the predictions themselves are ``outlook.py``'s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.policy.placement import GroupView

LATE_TOLERANCE_S = 0.005  # a timer that fires this late is not a budget miss
# The spill scan (every queued request's predicted start, every lease's free time) costs about half
# a microsecond per lease and queued request on this project's 2-core test machine: ~0.6 ms for a
# 1,280-sequence site with ~250 queued. On a saturated site releases, load reports and arrivals come every few hundred
# microseconds, so scans are rate-limited twice over:
# - after a release or a load report, at most one per SCAN_GAP_S; the rest is deferred to a timer
#   (well inside LATE_TOLERANCE_S; deadlines already spill ``margin_ms`` early);
# - every scan draws SCAN_ITEM_ALLOWANCE_S per item from an allowance that refills in real time,
#   with bursts of up to SCAN_BURST_S (a cell-rate algorithm), so predictions take at most about a
#   tenth of the router's loop however deep the queue. While the allowance lasts (small sites,
#   shallow queues, the start of a burst) an arrival is judged at once.
# A request whose deadline comes is judged on a timer at that deadline, whatever the allowance:
# predictions only ever spill earlier than that.
SCAN_GAP_S = 0.002
SCAN_ITEM_ALLOWANCE_S = 10e-6
SCAN_BURST_S = 0.02


class SpillScan:
    """The scan, its rate limits and its timer."""

    def _spill_scan(self, now: float, views: list[GroupView]) -> bool:
        """Spill what would miss its deadline on the preferred site; whether room elsewhere is left."""
        preferred, speed = self._preferred()
        items = sum(len(self._leases[g.group_id]) for g in preferred) + min(len(self.queue), self.spill.max_scan)
        self._scan_due = now + SCAN_GAP_S
        self._scan_tat = max(self._scan_tat, now) + items * SCAN_ITEM_ALLOWANCE_S
        simulation = self.predictor.simulate(now, self._free_at(now, preferred))
        budget_s, real_budget_s = self.gate.budget_ms() / 1000, self.spill.spill_after_ms / 1000
        pressure_s = self.spill.spill_after_ms * self.spill.close_ratio / 1000
        spilled_on_prediction = pressure = False
        next_deadline = float("inf")
        for queued, ticket, sequences, service_ms in self._waiting(speed):
            if ticket.pinned:
                simulation.take(sequences, service_ms)
                continue
            start = simulation.start(sequences)
            deadline = queued.enqueued_at + budget_s
            pressure |= start - queued.enqueued_at > pressure_s
            if start > deadline or now >= deadline:
                decision = self._place(ticket, views, allow_spill=True)
                if decision is not None and decision.group.site_rank > 0:
                    # Late: it waited past its budget while room elsewhere was there (since then).
                    since = max(queued.enqueued_at + real_budget_s, self._room_since or now)
                    ticket.late = now - since > LATE_TOLERANCE_S
                    spilled_on_prediction |= now < deadline
                    self.queue.remove(queued)
                    self._grant(queued, decision, now)
                    views = self.views()
                    if not self._room_elsewhere(views):
                        break
                    continue
            else:
                next_deadline = min(next_deadline, deadline)
            simulation.take(sequences, service_ms)
        self.gate.update(spilled_on_prediction, pressure)
        room = self._room_elsewhere(views)
        if room and next_deadline < float("inf"):
            self._arm(next_deadline)
        else:
            self._disarm()
        return room

    def _room_elsewhere(self, views: list[GroupView]) -> bool:
        return any(v.site_rank > 0 and v.healthy and v.free > 0 for v in views)

    def _arm(self, at: float) -> bool:
        """A pump at ``at`` at the latest; False where there is no loop to run it (synchronous
        unit use: the caller pumps)."""
        if self._timer is not None and self._timer_at <= at:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._disarm()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - self._clock()), self._fire)
        return True

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._scan_due = 0.0
        self.pump(deadline=True)  # a deadline or the deferred scan is due: scan now

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
