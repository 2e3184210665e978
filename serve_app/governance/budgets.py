"""Budgets in money, per scope (a tenant or a key) and calendar period (UTC day or month).

Money is counted in integer micro-units of the cost model's currency, so sums never drift.
Per (scope, period) the ledger holds what was settled (spent) and what requests in flight
reserved. A request is admitted only if ``spent + reserved + its estimate`` stays within the
limit, and its estimate is the most it can cost on any site it may run on. So spend passes the
limit only when a request's real cost exceeds its estimate, which only the prompt-token estimate
can cause, and never by more than that difference summed over the requests in flight.
"""

from __future__ import annotations

import time

MICROS = 1_000_000
PERIODS = ("day", "month")


def to_micros(amount: float) -> int:
    return int(round(amount * MICROS))


def period_key(period: str, now: float) -> str:
    """``day:2026-11-23`` or ``month:2026-11`` (UTC) for the wall-clock time ``now``."""
    tm = time.gmtime(now)
    if period == "day":
        return f"day:{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}"
    if period == "month":
        return f"month:{tm.tm_year:04d}-{tm.tm_mon:02d}"
    raise ValueError(f"unknown budget period {period!r}")


def fits(limit: int, spent: int, reserved: int, estimate: int) -> bool:
    return spent + reserved + estimate <= limit


def crossed(thresholds_pct: list[int], limit: int, spent: int, already: set[int]) -> list[int]:
    """Thresholds (percent of the limit) that settled spend has reached and that have not fired yet."""
    used = 100.0 * spent / limit if limit else 0.0
    return [t for t in sorted(thresholds_pct) if used >= t and t not in already]
