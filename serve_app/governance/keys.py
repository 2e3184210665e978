"""Tenants and API keys: what a key may do, how it is written, hashed and checked.

A key reads ``sk-spw-<id>.<secret>``: the id (12 hex digits) is not secret and finds the record;
the secret (32 random bytes) is stored only as its SHA-256 and compared with
``hmac.compare_digest``, also for an id that does not exist, so the time an answer takes tells
nothing about which keys exist. (A slow password hash buys nothing for 256 random bits.)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from serve_app.config.base import DataClassName, Strict

KEY_PREFIX = "sk-spw-"
_KEY = re.compile(r"sk-spw-([0-9a-f]{12})\.([A-Za-z0-9_-]{43})")
NAME_PATTERN = r"^[A-Za-z0-9._:\-]{1,64}$"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
PRIORITY_RANGE = (-10, 10)
# Spend is kept in micro-units in 64-bit integers (PostgreSQL BIGINT): a limit of a trillion currency
# units is 1e18 micros, with room for the spend of the requests in flight above it.
MAX_BUDGET = 1e12
MAX_RATE = 10**12
Residency = Literal["any", "onprem"]
Period = Literal["day", "month"]
BudgetPolicy = Literal["refuse", "onprem_only"]


class BudgetSpec(Strict):
    period: Period = Field(description="Calendar period in UTC: a day or a month.")
    limit: float = Field(gt=0, le=MAX_BUDGET, allow_inf_nan=False,
                         description="Spend allowed per period, in the cost model's currency.")
    policy: BudgetPolicy = Field(
        default="refuse", description="At the limit: refuse (429 insufficient_quota) or onprem_only (no paid spill).")


class LimitSpec(Strict):
    rpm: int | None = Field(default=None, ge=1, le=MAX_RATE, description="Requests per minute (sliding 60 s window).")
    tpm: int | None = Field(default=None, ge=1, le=MAX_RATE, description="Tokens (prompt + completion) per minute.")
    budgets: list[BudgetSpec] = Field(default_factory=list, description="Budgets in money, at most one per period.")
    residency: Residency = Field(default="any", description="onprem: this traffic never leaves on-prem sites.")

    @model_validator(mode="after")
    def _one_budget_per_period(self):
        periods = [b.period for b in self.budgets]
        if len(set(periods)) != len(periods):
            raise ValueError("at most one budget per period")
        return self


class TenantSpec(LimitSpec):
    """A tenant: limits, budgets and residency that hold for all of its keys together."""

    pii_policy: Literal["pin", "redact"] = Field(
        default="pin", description="An internal request holding PII: pin it to on-prem (pin), or send it "
        "anywhere internal data may go with each PII value replaced by a placeholder (redact).")
    audit_text_up_to: DataClassName | None = Field(
        default=None, description="The audit log keeps the request's and the answer's text for requests of "
        "this data class or lower (None: never; records always have everything else).")


class KeySpec(LimitSpec):
    """One API key: its tenant, and what holds for this key on top of the tenant's rules."""

    tenant: str = Field(pattern=NAME_PATTERN, description="The tenant the key belongs to.")
    name: str = Field(default="", max_length=64, description="A label for people.")
    tier: int = Field(default=0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1],
                      description="Admission priority; a request's x-spillway-priority may lower it, never raise it.")
    models: list[str] | None = Field(default=None, description="Models and aliases the key may use (None: all).")
    data_class: DataClassName | None = Field(
        default=None, description="The least data class this key's requests get (None: the router's default).")


@dataclass(frozen=True)
class KeyRecord:
    id: str
    hash: str
    spec: KeySpec
    created_at: float
    revoked_at: float | None = None

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    def public(self) -> dict:
        """What the admin API shows: never the hash."""
        return {"id": self.id, **self.spec.model_dump(mode="json"), "created_at": self.created_at,
                "revoked_at": self.revoked_at, "active": self.revoked_at is None}


def new_key() -> tuple[str, str, str]:
    """(key id, the key to hand out once, the hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{KEY_PREFIX}{key_id}.{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """(key id, secret hash) of a well-formed key, else None. Bounded: one fixed-length match."""
    if len(presented) > 80:
        return None
    match = _KEY.fullmatch(presented)
    return (match.group(1), hash_secret(match.group(2))) if match else None


def bearer(authorization: str) -> str:
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return ""


class KeyTable:
    """The keys a router knows, by id, as last read from the ledger (``version`` says which)."""

    def __init__(self, records: list[KeyRecord] | None = None, version: int = 0):
        self.version = version
        self.records = {r.id: r for r in records or ()}
        self.tenants: dict[str, TenantSpec] = {}

    @property
    def open(self) -> bool:
        """No key has ever been created: the demo serves everyone (and says so)."""
        return not self.records

    def check(self, presented: str) -> KeyRecord | None:
        """The active record for a presented key, else None; constant time in the secret."""
        parsed = parse_key(presented)
        key_id, digest = parsed if parsed is not None else ("", hash_secret(presented[:80]))
        record = self.records.get(key_id)
        ok = hmac.compare_digest(digest, record.hash if record is not None else _DUMMY_HASH)
        if record is None or not ok or record.revoked_at is not None:
            return None
        return record


def check_admin_key(presented: str, admin_key: str | None) -> bool:
    if not admin_key:
        return False
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(admin_key.encode()).digest())
