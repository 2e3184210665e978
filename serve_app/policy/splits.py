"""Traffic splits: a model alias served by weighted variants (A/B tests, canaries).

A request with a sticky key (the OpenAI ``user`` field or a session header)
always lands on the same variant for a given alias and set of weights: the
key is hashed into [0, 1) and mapped onto the cumulative weights. Requests
without a key are spread by weight with the injected random source. Per-variant
counters (requests, errors, time to first token, tokens) feed comparisons.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Variant:
    model: str
    weight: float


@dataclass
class VariantStats:
    requests: int = 0
    errors: int = 0
    server_errors: int = 0  # 5xx: what the rollout judges (a client's 4xx is not the variant's fault)
    output_tokens: int = 0
    ttft_ms_total: float = 0.0
    ttft_count: int = 0

    @property
    def mean_ttft_ms(self) -> float | None:
        return self.ttft_ms_total / self.ttft_count if self.ttft_count else None


@dataclass
class TrafficSplit:
    alias: str
    variants: Sequence[Variant]
    rand: Callable[[], float] = field(default=random.random)
    stats: dict[str, VariantStats] = field(init=False)

    def __post_init__(self):
        if not self.variants:
            raise ValueError(f"split {self.alias!r} needs at least one variant")
        if any(v.weight < 0 for v in self.variants) or sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"split {self.alias!r}: weights must be >= 0 and sum to more than 0")
        self.stats = {v.model: VariantStats() for v in self.variants}

    def set_weights(self, weights: dict[str, float]) -> None:
        """New weights (a rollout's step). Counters carry on; a new variant starts its own."""
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"split {self.alias!r}: weights must be >= 0 and sum to more than 0")
        self.variants = [Variant(model, float(weight)) for model, weight in weights.items()]
        for model in weights:
            self.stats.setdefault(model, VariantStats())

    def counters(self) -> dict[str, dict]:
        return {model: {"requests": s.requests, "server_errors": s.server_errors,
                        "ttft_ms_total": s.ttft_ms_total, "ttft_count": s.ttft_count}
                for model, s in self.stats.items()}

    def choose(self, sticky_key: str | None = None) -> str:
        point = self._hash_point(sticky_key) if sticky_key else self.rand()
        total = sum(v.weight for v in self.variants)
        cumulative = 0.0
        for variant in self.variants:
            cumulative += variant.weight / total
            if point < cumulative:
                return variant.model
        return next(v.model for v in reversed(self.variants) if v.weight > 0)  # (rounding at the top end)

    def _hash_point(self, key: str) -> float:
        digest = hashlib.sha256(f"{self.alias}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def record(self, model: str, *, error: bool = False, server_error: bool = False, ttft_ms: float | None = None,
               output_tokens: int = 0) -> None:
        stats = self.stats.setdefault(model, VariantStats())
        stats.requests += 1
        stats.errors += int(error)
        stats.server_errors += int(server_error)
        stats.output_tokens += output_tokens
        if ttft_ms is not None:
            stats.ttft_ms_total += ttft_ms
            stats.ttft_count += 1
