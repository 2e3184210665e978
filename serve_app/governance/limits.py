"""Rate limits: a sliding window per scope (a key or a tenant) and kind (requests or tokens).

``SlidingWindow`` keeps one entry per admitted request (time, amount). A request is admitted only
if the amounts admitted in the last ``window_s`` seconds plus its own stay within the limit, so in
*any* 60-second span at most ``limit`` is admitted: no burst of twice the limit at a window edge
(fixed windows allow that), no early throttling at 70-90 % (the sum is exact, not sampled).

Tokens are reserved at admission (the prompt estimate plus ``max_tokens`` x sequences) and the
entry is settled to the real count later. The one overshoot: an entry settled above its
reservation, which only the prompt estimate can cause (completion tokens never exceed
``max_tokens``). One ledger holds every window, so the number of router replicas does not enter.

For the store, a window also keeps its amounts summed per second (``buckets``, at most 61), so
writing it costs the same at 10 requests a minute as at 100,000. A window read back after a
restart has one entry per second, stamped at the end of its second: its amounts leave the window
up to one second late, never early, so a restart can throttle a little early but never lets more
through than the limit.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW_S = 60.0


class Entry:
    __slots__ = ("at", "amount", "live")

    def __init__(self, at: float, amount: int):
        self.at = at
        self.amount = amount
        self.live = True  # still inside the window (counted in its total)


class SlidingWindow:
    def __init__(self, limit: int, window_s: float = WINDOW_S):
        self.limit = limit
        self.window_s = window_s
        self.entries: deque[Entry] = deque()
        self.total = 0
        self.buckets: dict[int, int] = {}  # second (rounded up) -> amount of the live entries in it

    def _bucket_add(self, at: float, amount: int) -> None:
        second = math.ceil(at)
        left = self.buckets.get(second, 0) + amount
        if left:
            self.buckets[second] = left
        else:
            self.buckets.pop(second, None)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self.entries
        while entries and entries[0].at <= horizon:
            entry = entries.popleft()
            entry.live = False
            self.total -= entry.amount
            self._bucket_add(entry.at, -entry.amount)

    def fits(self, now: float, amount: int) -> bool:
        self._prune(now)
        return self.total + amount <= self.limit

    def take(self, now: float, amount: int) -> Entry:
        """Record an admission (the caller checked ``fits`` for every scope first)."""
        entry = Entry(now, amount)
        self.entries.append(entry)
        self.total += amount
        self._bucket_add(now, amount)
        return entry

    def settle(self, entry: Entry, amount: int) -> None:
        """The real amount of an admitted entry; nothing happens once it left the window."""
        if entry.live:
            self.total += amount - entry.amount
            self._bucket_add(entry.at, amount - entry.amount)
        entry.amount = amount

    def remaining(self, now: float) -> int:
        self._prune(now)
        return max(0, self.limit - self.total)

    def reset_s(self, now: float) -> float:
        """Time until the window is back to its full limit (every entry in it has left)."""
        self._prune(now)
        return max(0.0, self.entries[-1].at + self.window_s - now) if self.entries else 0.0

    def retry_after_s(self, now: float, amount: int) -> float:
        """Time until ``amount`` fits (the window length if it never will: over the limit alone)."""
        self._prune(now)
        if amount > self.limit:
            return self.window_s
        excess = self.total + amount - self.limit
        for entry in self.entries:
            if excess <= 0:
                break
            excess -= entry.amount
            if excess <= 0:
                return max(0.0, entry.at + self.window_s - now)
        return 0.0

    def dump(self) -> list[list[int]]:
        """What the store keeps: ``[second, amount]`` per second that still has entries."""
        return [[second, amount] for second, amount in self.buckets.items()]

    @classmethod
    def load(cls, limit: int, rows: list, now: float, window_s: float = WINDOW_S) -> "SlidingWindow":
        window = cls(limit, window_s)
        for at, amount in rows:
            if at > now - window_s:
                window.take(float(at), int(amount))
        return window


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1:
        return f"{int(minutes)}m{secs:.0f}s"
    return f"{secs:.3g}s"
