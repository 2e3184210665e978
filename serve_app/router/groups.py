"""An engine group as the router's scheduler sees it: one (model, site) deployment's static facts,
and its measured speed."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.policy.classify import DataClass


@dataclass(frozen=True)
class EngineGroup:
    """Static facts about one (model, site) engine deployment."""

    group_id: str
    model: str
    site: str
    site_rank: int
    trusted_up_to: DataClass
    replicas: int
    max_num_seqs: int
    cost_per_1k_tokens: float = 0.0
    autoscaled: bool = False  # its replicas follow spill pressure (0..N): none now may mean "coming"

    @property
    def capacity(self) -> int:
        return self.replicas * self.max_num_seqs


@dataclass
class Speed:
    """An engine group's measured time per output token and to first token (ms)."""

    itl_ms: float
    ttft_ms: float
