"""Governance: where the ledger keeps its state, the admin key, how routers talk to the ledger,
and budget alerts. Tenants and keys themselves are data (created through the admin API or
``spillway keys``), not config: they change without a restart."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from pydantic import Field, model_validator

from serve_app.config.base import Strict

DEFAULT_STATE_DIR = Path(os.environ.get("SPILLWAY_STATE_DIR", Path.home() / ".cache" / "spillway"))


class StoreKind(str, Enum):
    sqlite = "sqlite"
    postgres = "postgres"


class StoreConfig(Strict):
    kind: StoreKind = Field(default=StoreKind.sqlite, description="sqlite (embedded, one node) or postgres (clusters).")
    path: str | None = Field(
        default=None, description="SQLite file on the ledger's node (default <SPILLWAY_STATE_DIR>/ledger.sqlite3).")
    dsn_env: str = Field(
        default="SPILLWAY_LEDGER_DSN",
        description="Environment variable holding the PostgreSQL connection string (never in the config file).")

    def sqlite_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else DEFAULT_STATE_DIR / "ledger.sqlite3"


class ArchiveConfig(Strict):
    """Where closed audit segments go: S3 or any S3-compatible server. Credentials come from the
    ledger process's environment (boto3's usual chain: AWS_ACCESS_KEY_ID, instance roles, ...)."""

    bucket: str = Field(min_length=3, max_length=63, description="The bucket (it must exist).")
    prefix: str = Field(default="spillway-audit/", max_length=512, description="Key prefix of the segments.")
    endpoint_url: str | None = Field(default=None, description="An S3-compatible server's URL (None: AWS).")
    region: str = Field(default="us-east-1", description="The bucket's region.")


class AuditConfig(Strict):
    enabled: bool = Field(default=True, description="One hash-chained record per request (no text unless a "
                          "tenant opts in).")
    dir: str | None = Field(default=None, description="Directory of the log on the ledger's node (default: "
                            "audit/ beside the SQLite ledger, else <SPILLWAY_STATE_DIR>/audit).")
    signing_key_path: str | None = Field(
        default=None, description="Ed25519 private key (PEM) that signs checkpoints; made on first start if "
        "missing (default: audit-signing.key beside the log directory, mode 0600).")
    rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, description="A segment closes at this size...")
    rotate_s: float = Field(default=3600.0, gt=0, description="...or this old, whichever comes first.")
    archive: ArchiveConfig | None = Field(default=None, description="Closed segments are copied here.")

    def directory(self, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
        return Path(self.dir).expanduser() if self.dir else state_dir / "audit"

    def key_path(self, state_dir: Path = DEFAULT_STATE_DIR) -> Path:
        return Path(self.signing_key_path).expanduser() if self.signing_key_path else \
            self.directory(state_dir).parent / "audit-signing.key"


class CacheConfig(Strict):
    """The response cache: exact matches of deterministic requests, per tenant, in each router
    replica's memory (on the router's site)."""

    enabled: bool = Field(default=True, description="Answer a repeated deterministic request (temperature 0 "
                          "or a fixed seed) from the cache.")
    max_entries: int = Field(default=10_000, ge=1, description="Entries per router replica (least recently "
                             "used go first).")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Bytes of answers per router replica.")
    max_age_s: float = Field(default=600.0, gt=0, description="An answer is served from the cache for this long.")


class GovernanceConfig(Strict):
    store: StoreConfig = Field(default_factory=StoreConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    admin_key_env: str = Field(
        default="SPILLWAY_ADMIN_KEY",
        description="Environment variable (of the router processes) holding the admin key for the admin API. "
        "Unset: the admin API answers 401 to everyone.")
    flush_interval_ms: int = Field(
        default=100, ge=10, le=10_000,
        description="The ledger writes changed spend, usage and windows to the store this often (and on "
        "shutdown); a crash of the ledger process loses at most this much settled spend.")
    settle_batch_ms: int = Field(
        default=50, ge=1, le=5_000, description="Routers send finished requests' settlements to the ledger in "
        "batches this often.")
    heartbeat_s: float = Field(default=1.0, gt=0, le=60, description="Routers report to the ledger this often.")
    router_lost_after_s: float = Field(
        default=10.0, gt=0, description="A router silent this long is gone: its open reservations are charged "
        "in full (the engine may have run them to the end).")
    keys_refresh_s: float = Field(
        default=1.0, gt=0, le=60,
        description="Routers ask the ledger whether the key table changed at least this often, and re-read it "
        "when it did (a key created on one router reaches the others within this bound; a request with a key a "
        "router does not know yet re-reads at once; revocation is checked by the ledger on every request, so "
        "it is immediate).")
    chars_per_token: float = Field(
        default=4.0, gt=0, description="Prompt tokens estimated at admission from the body size (as OpenAI does); "
        "settled with the engine's real count.")
    alert_thresholds_pct: list[int] = Field(
        default_factory=lambda: [50, 80, 100], description="Budget alerts fire once per period at each of these.")
    alert_webhook_url: str | None = Field(
        default=None, description="Optional URL that gets a JSON POST for each budget alert.")

    def state_dir(self) -> Path:
        """Where the ledger's own files live: beside the SQLite file, else SPILLWAY_STATE_DIR."""
        return self.store.sqlite_path().parent if self.store.kind == StoreKind.sqlite else DEFAULT_STATE_DIR

    def audit_dir(self) -> Path:
        return self.audit.directory(self.state_dir())

    def audit_key_path(self) -> Path:
        return self.audit.key_path(self.state_dir())

    @model_validator(mode="after")
    def _check(self) -> "GovernanceConfig":
        if any(not 0 < t <= 1000 for t in self.alert_thresholds_pct):
            raise ValueError("alert_thresholds_pct must be between 1 and 1000")
        if self.alert_webhook_url is not None and not self.alert_webhook_url.startswith(("http://", "https://")):
            raise ValueError("alert_webhook_url must be an http(s) URL")
        return self
