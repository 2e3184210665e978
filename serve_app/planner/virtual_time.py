"""An asyncio event loop whose clock is virtual: when nothing is ready to run, time jumps to the
next timer instead of waiting for it.

The router's scheduler runs on asyncio (futures for queued requests, ``call_later`` for its spill
timer) and takes an injected clock. Run it on this loop with ``clock=loop.time`` and an hour of
traffic plays out as fast as the code runs, through the very same code paths. Nothing here does
I/O: a loop that would wait with no timer set is a simulation that can never finish (``Stalled``).

The loop keeps its own timer heap of ``(when, sequence, handle)`` tuples, compared in C (asyncio's
own heap compares handles in Python), drops cancelled timers when it reaches them, and never asks
the selector anything: a simulation of millions of requests spends its time in the router's code,
not in the loop's.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Stalled(RuntimeError):
    """Every task waits and no timer is set: the simulated system can never make progress."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0):
        super().__init__()
        self._now = start
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._sequence = itertools.count()

    def time(self) -> float:
        return self._now

    def call_at(self, when, callback, *args, context=None):
        timer = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        timer._scheduled = True
        return timer

    def _timer_handle_cancelled(self, handle) -> None:
        pass  # (a cancelled timer is dropped when the clock reaches it)

    def _run_once(self) -> None:
        ready, timers = self._ready, self._timers
        if not ready and not self._stopping:
            while timers and timers[0][2].cancelled():
                heapq.heappop(timers)
            if not timers:
                raise Stalled("every task waits and no timer is set")
            if timers[0][0] > self._now:
                self._now = timers[0][0]  # nothing to do until then: jump
        now = self._now
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            if not handle.cancelled():
                handle._scheduled = False
                ready.append(handle)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if not handle.cancelled():
                handle._run()


def run_virtual(main, start: float = 0.0):
    """Run the coroutine function ``main(loop)`` to completion in virtual time; returns its result."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()
