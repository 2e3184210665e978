"""An asyncio event loop whose clock is virtual: when nothing is ready to run, time jumps to the
next timer instead of waiting for it.

The router's scheduler runs on asyncio (futures for queued requests, ``call_later`` for its spill
timer) and takes an injected clock. Run it on this loop with ``clock=loop.time`` and an hour of
traffic plays out as fast as the code runs, through the very same code paths. Nothing here does
I/O: a loop that would wait with no timer set is a simulation that can never finish (``Stalled``).
"""

from __future__ import annotations

import asyncio
import selectors


class Stalled(RuntimeError):
    """Every task waits and no timer is set: the simulated system can never make progress."""


class _JumpingSelector(selectors.DefaultSelector):
    """Registers what the loop needs (its self-pipe) but never blocks: a wait of ``timeout``
    seconds moves the loop's virtual clock on by that much."""

    def __init__(self):
        super().__init__()
        self.loop: "VirtualTimeLoop | None" = None

    def select(self, timeout=None):
        if timeout is None:
            raise Stalled("every task waits and no timer is set")
        if timeout > 0:
            self.loop.advance(timeout)
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0):
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = start

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run_virtual(main, start: float = 0.0):
    """Run the coroutine function ``main(loop)`` to completion in virtual time; returns its result."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        loop.close()
