"""Where the ledger keeps what must survive: tenants, keys, spend, usage, fired alerts and the
rate-limit windows. SQLite (embedded, one node) or PostgreSQL (clusters), one schema and the
same statements (``INSERT ... ON CONFLICT`` works in both).

The calls are blocking; the ledger runs them on a worker thread, one at a time, never on its
event loop. Spend and usage are written as increments (``spend = spend + delta``), so an update
is atomic in the database and a second writer (for a moment during a redeploy) adds, never
overwrites.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.config.governance import StoreConfig, StoreKind
from serve_app.errors import ConfigError

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tenants (
        name TEXT PRIMARY KEY, spec TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, hash TEXT NOT NULL, spec TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS spend (
        scope TEXT NOT NULL, period TEXT NOT NULL, micros BIGINT NOT NULL, PRIMARY KEY (scope, period))""",
    """CREATE TABLE IF NOT EXISTS usage (
        day TEXT NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, site TEXT NOT NULL,
        requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL, PRIMARY KEY (day, tenant, key_id, model, site))""",
    """CREATE TABLE IF NOT EXISTS budget_alerts (
        scope TEXT NOT NULL, period TEXT NOT NULL, threshold INTEGER NOT NULL, fired_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, period, threshold))""",
    """CREATE TABLE IF NOT EXISTS rate_windows (
        scope TEXT NOT NULL, kind TEXT NOT NULL, entries TEXT NOT NULL, PRIMARY KEY (scope, kind))""",
    """CREATE TABLE IF NOT EXISTS router_batches (
        router TEXT PRIMARY KEY, batch BIGINT NOT NULL, seen_at DOUBLE PRECISION NOT NULL)""",
]
BATCHES_KEPT_S = 7 * 86400  # a router replica silent this long is gone; its last batch number is dropped
USAGE_COLUMNS = ("tenant", "key_id", "model", "site")


@dataclass
class Snapshot:
    tenants: dict[str, dict] = field(default_factory=dict)
    keys: list[dict] = field(default_factory=list)
    spend: dict[tuple[str, str], int] = field(default_factory=dict)
    alerts: set[tuple[str, str, int]] = field(default_factory=set)
    windows: dict[tuple[str, str], list] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)  # router -> its last settlement batch applied


@dataclass
class Flush:
    """What changed since the last write."""

    spend: dict[tuple[str, str], int] = field(default_factory=dict)  # increments
    usage: dict[tuple[str, str, str, str, str], list[int]] = field(default_factory=dict)  # increments
    alerts: list[tuple[str, str, int, float]] = field(default_factory=list)
    windows: dict[tuple[str, str], list] = field(default_factory=dict)  # whole windows
    batches: dict[str, tuple[int, float]] = field(default_factory=dict)  # router -> (last batch applied, when)

    def __bool__(self) -> bool:
        return bool(self.spend or self.usage or self.alerts or self.windows or self.batches)

    def merge(self, later: "Flush") -> None:
        """Fold a later flush into this one (a failed write is retried with what came after)."""
        for k, v in later.spend.items():
            self.spend[k] = self.spend.get(k, 0) + v
        for k, v in later.usage.items():
            row = self.usage.setdefault(k, [0, 0, 0, 0])
            for i, x in enumerate(v):
                row[i] += x
        self.alerts += later.alerts
        self.windows.update(later.windows)
        self.batches.update(later.batches)


class Store:
    """The statements; subclasses give the connection and the placeholder style."""

    placeholder = "?"

    def __init__(self):
        self._lock = threading.Lock()

    def _connect(self):
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _run(self, work):
        with self._lock:
            conn = self._connection()
            try:
                result = work(conn.cursor())
                conn.commit()
                return result
            except Exception:
                self._rollback(conn)
                raise

    def _connection(self):
        raise NotImplementedError

    def _rollback(self, conn) -> None:
        try:
            conn.rollback()
        except Exception:  # noqa: BLE001 - the connection may be gone; the next call reconnects
            self._reset()

    def _reset(self) -> None:
        pass

    def migrate(self) -> None:
        def work(cur):
            for statement in SCHEMA:
                cur.execute(statement)
        self._run(work)

    def load(self, now: float | None = None) -> Snapshot:
        now = time.time() if now is None else now

        def work(cur):
            snap = Snapshot()
            cur.execute("SELECT name, spec FROM tenants")
            snap.tenants = {name: json.loads(spec) for name, spec in cur.fetchall()}
            cur.execute("SELECT id, tenant, hash, spec, created_at, revoked_at FROM api_keys")
            snap.keys = [{"id": r[0], "tenant": r[1], "hash": r[2], "spec": json.loads(r[3]), "created_at": r[4],
                          "revoked_at": r[5]} for r in cur.fetchall()]
            cur.execute("SELECT scope, period, micros FROM spend")
            snap.spend = {(s, p): int(m) for s, p, m in cur.fetchall()}
            cur.execute("SELECT scope, period, threshold FROM budget_alerts")
            snap.alerts = {(s, p, int(t)) for s, p, t in cur.fetchall()}
            cur.execute("SELECT scope, kind, entries FROM rate_windows")
            snap.windows = {(s, k): json.loads(e) for s, k, e in cur.fetchall()}
            cur.execute(self._sql("DELETE FROM router_batches WHERE seen_at < ?"), (now - BATCHES_KEPT_S,))
            cur.execute("SELECT router, batch FROM router_batches")
            snap.batches = {router: int(batch) for router, batch in cur.fetchall()}
            return snap
        return self._run(work)

    def put_tenant(self, name: str, spec: dict, now: float) -> None:
        self._run(lambda cur: cur.execute(self._sql(
            "INSERT INTO tenants (name, spec, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"),
            (name, json.dumps(spec, sort_keys=True), now)))

    def put_key(self, key_id: str, tenant: str, digest: str, spec: dict, created_at: float,
                revoked_at: float | None) -> None:
        self._run(lambda cur: cur.execute(self._sql(
            "INSERT INTO api_keys (id, tenant, hash, spec, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET spec = excluded.spec, revoked_at = excluded.revoked_at"),
            (key_id, tenant, digest, json.dumps(spec, sort_keys=True), created_at, revoked_at)))

    def write(self, flush: Flush) -> None:
        """One transaction: spend and usage increments, new alerts, rate windows, and the routers'
        settlement batch numbers whose effects those increments hold."""
        def work(cur):
            for (scope, period), delta in flush.spend.items():
                cur.execute(self._sql(
                    "INSERT INTO spend (scope, period, micros) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, period) DO UPDATE SET micros = spend.micros + excluded.micros"),
                    (scope, period, delta))
            for key, (requests, prompt, completion, cost) in flush.usage.items():
                cur.execute(self._sql(
                    "INSERT INTO usage (day, tenant, key_id, model, site, requests, prompt_tokens, completion_tokens, "
                    "cost_micros) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, tenant, key_id, model, site) "
                    "DO UPDATE SET requests = usage.requests + excluded.requests, "
                    "prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = usage.completion_tokens + excluded.completion_tokens, "
                    "cost_micros = usage.cost_micros + excluded.cost_micros"),
                    (*key, requests, prompt, completion, cost))
            for scope, period, threshold, at in flush.alerts:
                cur.execute(self._sql(
                    "INSERT INTO budget_alerts (scope, period, threshold, fired_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (scope, period, threshold) DO NOTHING"), (scope, period, threshold, at))
            for (scope, kind), entries in flush.windows.items():
                cur.execute(self._sql(
                    "INSERT INTO rate_windows (scope, kind, entries) VALUES (?, ?, ?) "
                    "ON CONFLICT (scope, kind) DO UPDATE SET entries = excluded.entries"),
                    (scope, kind, json.dumps(entries)))
            for router, (batch, at) in flush.batches.items():
                cur.execute(self._sql(
                    "INSERT INTO router_batches (router, batch, seen_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (router) DO UPDATE SET batch = excluded.batch, seen_at = excluded.seen_at"),
                    (router, batch, at))
        self._run(work)

    def usage(self, first_day: str, last_day: str, by: tuple[str, ...]) -> list[dict]:
        """Requests, tokens and cost summed per ``by`` (columns of ``USAGE_COLUMNS``) over days."""
        unknown = set(by) - set(USAGE_COLUMNS)
        if unknown:
            raise ValueError(f"cannot group usage by {sorted(unknown)}")
        columns = ", ".join(by)
        select = (columns + ", " if by else "") + \
            "SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_micros)"
        group = f" GROUP BY {columns} ORDER BY {columns}" if by else ""

        def work(cur):
            cur.execute(self._sql(f"SELECT {select} FROM usage WHERE day >= ? AND day <= ?{group}"),
                        (first_day, last_day))
            rows = []
            for row in cur.fetchall():
                named = dict(zip(by, row[:len(by)]))
                requests, prompt, completion, cost = (int(x or 0) for x in row[len(by):])
                if requests or not by:
                    rows.append({**named, "requests": requests, "prompt_tokens": prompt,
                                 "completion_tokens": completion, "cost": cost / 1_000_000})
            return rows
        return self._run(work)

    def close(self) -> None:
        pass


class SQLiteStore(Store):
    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None

    def _connection(self):
        if self._conn is None:
            # One worker thread at a time uses it (the lock), not always the same one.
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"


class PostgresStore(Store):
    placeholder = "%s"

    def __init__(self, dsn: str):
        super().__init__()
        self._dsn = dsn
        self._conn = None

    def _connection(self):
        if self._conn is None or self._conn.closed:
            import psycopg

            self._conn = psycopg.connect(self._dsn, connect_timeout=10)
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def describe(self) -> str:
        return "postgres"


def open_store(config: StoreConfig, environ: Any = os.environ) -> Store:
    if config.kind == StoreKind.postgres:
        dsn = environ.get(config.dsn_env)
        if not dsn:
            raise ConfigError(f"governance.store.kind is postgres but ${config.dsn_env} is not set "
                              "(the connection string comes from the environment, never the config file)")
        store: Store = PostgresStore(dsn)
    else:
        store = SQLiteStore(config.sqlite_path())
    store.migrate()
    return store
