"""A request's claim on engine sequences: the only thing that gives them back, exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.router.groups import EngineGroup
    from serve_app.router.scheduler import ModelScheduler


class Lease:
    """``sequences`` slots of one engine group, held from admission until the request leaves the
    engine. The request's context owns it and releases it on every exit (finished, failed,
    cancelled, client gone); a second ``release`` does nothing. While it runs, the relay
    records the tokens streamed, so the scheduler can predict when the sequences free."""

    __slots__ = ("_scheduler", "group", "sequences", "queue_ms", "spill_reason", "acquired_at",
                 "expected_tokens", "tokens_out", "first_token_at", "streaming", "budget_miss", "released")

    def __init__(self, scheduler: "ModelScheduler", group: "EngineGroup", sequences: int, queue_ms: float,
                 spill_reason: str, acquired_at: float, expected_tokens: int, budget_miss: bool = False):
        self._scheduler = scheduler
        self.group = group
        self.sequences = sequences
        self.queue_ms = queue_ms
        self.spill_reason = spill_reason
        self.acquired_at = acquired_at
        self.expected_tokens = expected_tokens
        self.tokens_out = 0
        self.first_token_at: float | None = None
        self.streaming = False
        self.budget_miss = budget_miss
        self.released = False

    def release(self, engine_full: bool = False) -> bool:
        """Give the sequences back (and hand them to the next queued request). True the first time.
        ``engine_full``: the engine refused the request because other routers fill it; the group
        counts as full until its next load report."""
        if self.released:
            return False
        self.released = True
        self._scheduler.release(self, engine_full)
        return True

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Lease({self.group.group_id}, sequences={self.sequences}, {state})"
