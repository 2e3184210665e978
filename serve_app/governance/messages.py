"""What routers and the ledger say to each other: an admission request and its answer (an
admission or a denial), and a settlement. Plain frozen records: ``channel.py`` sends them over the
ledger's port, the Serve handle fallback as they are (``ledger.py`` decides on them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdmitRequest:
    router: str
    key_id: str | None
    tenant: str
    model: str
    tokens: int  # prompt estimate + max_tokens x sequences
    cost_any: int  # micros: the most it can cost on any site it may use
    cost_onprem: int | None  # micros on on-prem sites only; None when the model has none
    id: str = ""  # the reservation's id, made by the router (so it can void an answer it never got)


@dataclass(frozen=True)
class Admission:
    reservation: str
    tenant: str
    onprem_only: bool
    accounts: tuple[tuple[str, str], ...]
    cost: int
    tokens: int
    headers: dict[str, str]


@dataclass(frozen=True)
class Denial:
    status: int
    code: str
    message: str
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settlement:
    router: str
    reservation: str | None
    key_id: str | None
    tenant: str
    model: str
    site: str
    prompt_tokens: int
    completion_tokens: int
    cost: int  # micros
    accounts: tuple[tuple[str, str], ...] = ()  # from the admission; used if the ledger forgot it
