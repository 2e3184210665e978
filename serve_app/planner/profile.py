"""Engine performance profiles: how fast one replica of a model serves on one kind of hardware.

A profile gives the time to first token as a fixed overhead plus prefill at ``prefill_tokens_per_s``
plus what a busy replica adds (``ttft_extra_ms``: sequences running -> milliseconds; a new prompt
shares the engine's steps with the batch), and the time per output token of each running sequence
as a function of how many run at once (``itl_ms``). Both tables are interpolated linearly between
the points given and flat past the last. ``max_num_seqs`` is the replica's batch limit, as in the
engine config.
"""

from __future__ import annotations

import bisect

from pydantic import Field, field_validator

from serve_app.config.base import Strict


class EngineProfile(Strict):
    name: str = Field(description="Short name, e.g. 'l4-llama-8b' or 'cpu-local-dense'.")
    source: str = Field(description="Where the figures come from: a measurement (command, date, machine) or a "
                                    "publication (title and URL).")
    max_num_seqs: int = Field(gt=0, description="Sequences one replica runs at once.")
    prefill_tokens_per_s: float = Field(gt=0, description="Prompt tokens one replica prefills per second.")
    ttft_overhead_ms: float = Field(default=0.0, ge=0, description="Time to first token besides prefill "
                                                                   "(scheduling, the first decode step).")
    itl_ms: dict[int, float] = Field(description="Batch size -> time per output token of each sequence (ms).")
    ttft_extra_ms: dict[int, float] = Field(default_factory=lambda: {1: 0.0}, description=(
        "Sequences running on the replica (the new one included) -> time added to the first token (ms)."))

    @field_validator("itl_ms")
    @classmethod
    def _points(cls, value: dict[int, float]) -> dict[int, float]:
        if not value or min(value) < 1 or min(value.values()) <= 0:
            raise ValueError("itl_ms needs at least one point, batch sizes >= 1 and times > 0")
        return dict(sorted(value.items()))

    @field_validator("ttft_extra_ms")
    @classmethod
    def _extra_points(cls, value: dict[int, float]) -> dict[int, float]:
        if not value or min(value) < 1 or min(value.values()) < 0:
            raise ValueError("ttft_extra_ms needs at least one point, batch sizes >= 1 and times >= 0")
        return dict(sorted(value.items()))

    def itl_at(self, batch: int) -> float:
        return _interpolate(self.itl_ms, batch)

    def ttft_ms(self, prompt_tokens: int, batch: int = 1) -> float:
        return (self.ttft_overhead_ms + 1000.0 * prompt_tokens / self.prefill_tokens_per_s
                + _interpolate(self.ttft_extra_ms, batch))


def batch_points(max_num_seqs: int) -> list[int]:
    """The batch sizes a profile gives figures at: 1, 2, 4, ... (up to 256) below the batch limit,
    and the limit itself."""
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_num_seqs} | {max_num_seqs})


def _interpolate(points: dict[int, float], batch: int) -> float:
    sizes = list(points)
    if batch <= sizes[0]:
        return points[sizes[0]]
    if batch >= sizes[-1]:
        return points[sizes[-1]]
    i = bisect.bisect_left(sizes, batch)
    low, high = sizes[i - 1], sizes[i]
    share = (batch - low) / (high - low)
    return points[low] + share * (points[high] - points[low])
