"""The ledger as a Serve deployment: one replica per cluster, on the router's (on-prem) site.

It owns the ``Ledger`` (``ledger.py``), writes its changes to the store every
``flush_interval_ms`` on a worker thread (never on its event loop), charges the reservations of
router replicas that went silent, and turns budget alerts into a metric, a structured log line
and an optional webhook POST. Serve restarts it if it dies; it reloads from the store.

It also writes the audit log (``audit.py``): the routers' records arrive with their settlement
batches and are chained, written and signed on the same flush, then archived when a segment
closes. What a crash can lose: the records a router had not sent yet (at most
``settle_batch_ms`` of them, or more while the ledger was unreachable) and those the ledger had
not written yet (at most ``flush_interval_ms``); a graceful shutdown writes both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from serve_app.config import SpillwayConfig
from serve_app.governance.audit import Archiver, AuditWriter, load_or_create_key, tail
from serve_app.governance.channel import SECRET_BYTES, LedgerPort
from serve_app.governance.keys import KeySpec, TenantSpec
from serve_app.governance.ledger import Ledger
from serve_app.governance.messages import AdmitRequest, Settlement
from serve_app.governance.store import open_store

logger = logging.getLogger("spillway.ledger")
REAP_EVERY_S = 1.0
ARCHIVE_RETRY_S = 30.0
MAX_AUDIT_PENDING = 1_000_000
WEBHOOK_TIMEOUT_S = 5.0


class LedgerService:
    def __init__(self, config: dict):
        self.config = SpillwayConfig.model_validate(config)
        self.settings = self.config.governance
        self.store = open_store(self.settings.store)
        self.ledger = Ledger(self.store, self.settings)
        self._tasks: list[asyncio.Task] = []
        self._write_lock = asyncio.Lock()
        self._webhooks: set[asyncio.Task] = set()
        self._alerts = None
        self.port = LedgerPort(self.ledger, secrets.token_bytes(SECRET_BYTES), self.apply_sync)
        audit = self.settings.audit
        self.audit = AuditWriter(self.settings.audit_dir(), load_or_create_key(self.settings.audit_key_path()),
                                 audit.rotate_bytes, audit.rotate_s) if audit.enabled else None
        self.archiver = Archiver(audit.archive.bucket, audit.archive.prefix, audit.archive.endpoint_url,
                                 audit.archive.region) if audit.enabled and audit.archive else None
        self._audit_pending: list[dict] = []
        self._audit_lock = asyncio.Lock()
        self._archive_task: asyncio.Task | None = None
        self._archive_failed_at: float | None = None
        self._port_open: asyncio.Task | None = None
        logger.info("ledger started on %s: %d key(s), %d tenant(s)", self.store.describe(),
                    len(self.ledger.keys), len(self.ledger.tenants))

    def _start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._flush_loop()), loop.create_task(self._reap_loop())]
            self._port_open = loop.create_task(self._open_port())

    async def _open_port(self) -> None:
        try:
            await self.port.start(_node_address())
        except Exception:  # noqa: BLE001 - routers then admit through the handle
            logger.exception("the ledger's admission port did not open; routers use the Serve handle")

    async def check_health(self) -> None:
        self._start()

    # ---- the routers' calls ------------------------------------------------------------------------

    async def endpoint(self) -> dict | None:
        """Where routers send admissions (``channel.py``): address and secret of the port, or
        ``None`` while it is not open."""
        self._start()
        await asyncio.shield(self._port_open)
        if self.port.address is None:
            return None
        host, port = self.port.address
        return {"host": host, "port": port, "secret": self.port.secret.hex()}

    async def admit(self, request: AdmitRequest):
        """The same answer as the port's, for a router that cannot reach the port."""
        self._start()
        return self.ledger.admit(request)

    async def sync(self, router: str, settlements: list[Settlement], voids: tuple[str, ...] = (),
                   records: list[dict] | None = None, batch: int | None = None) -> int:
        """The handle's way to ``apply_sync`` (the routers use the port, ``channel.py``)."""
        return self.apply_sync(router, settlements, tuple(voids), records or [], batch)

    def apply_sync(self, router: str, settlements: list[Settlement], voids: tuple[str, ...],
                   records: list[dict], batch: int | None) -> int:
        """A router's batch of finished requests (possibly none: a heartbeat), of admissions
        whose answer it never got, and of audit records. Returns the key-table version, so routers
        re-read the table when it changed. ``batch`` numbers a router's batches: a router sends a
        batch whose answer it lost again under the same number, and it is applied once
        (``Ledger.accept_batch``)."""
        self._start()
        self.ledger.heartbeat(router)
        if batch is not None and not self.ledger.accept_batch(router, batch):
            return self.ledger.version  # applied already; its answer was lost
        if records and self.audit is not None:
            self._audit_pending.extend(records)
            if len(self._audit_pending) > MAX_AUDIT_PENDING:
                dropped = len(self._audit_pending) - MAX_AUDIT_PENDING
                del self._audit_pending[:dropped]
                logger.error("audit log not writable: dropped the %d oldest record(s)", dropped)
        for reservation in voids:
            self.ledger.void(router, reservation)
        for settlement in settlements:
            self.ledger.settle(settlement)
        self._publish_alerts()
        return self.ledger.version

    async def key_table(self) -> dict:
        self._start()
        return self.ledger.key_table()

    # ---- admin -------------------------------------------------------------------------------------

    async def create_key(self, spec: dict) -> dict:
        parsed = KeySpec.model_validate(spec)
        async with self._admin():
            record, plaintext = self.ledger.plan_key(parsed)
            await asyncio.to_thread(self.ledger.save_key, record)
            self.ledger.apply_key(record)
        return {**record.public(), "key": plaintext}

    async def rotate_key(self, key_id: str) -> dict | None:
        """A new key with the same rules; the old one is revoked in the same step."""
        async with self._admin():
            old = self.ledger.keys.get(key_id)
            if old is None or old.revoked_at is not None:
                return None
            record, plaintext = self.ledger.plan_key(old.spec)
            revoked = self.ledger.plan_revoke(key_id)

            def save():
                self.ledger.save_key(record)
                self.ledger.save_key(revoked)

            await asyncio.to_thread(save)
            self.ledger.apply_key(record)
            self.ledger.apply_key(revoked)
        return {**record.public(), "key": plaintext, "replaces": key_id}

    async def revoke_key(self, key_id: str) -> dict | None:
        async with self._admin():
            record = self.ledger.plan_revoke(key_id)
            if record is None:
                return None
            await asyncio.to_thread(self.ledger.save_key, record)
            self.ledger.apply_key(record)
        return record.public()

    async def list_keys(self) -> list[dict]:
        return [r.public() for r in self.ledger.keys.values()]

    async def set_tenant(self, name: str, spec: dict) -> dict:
        parsed = TenantSpec.model_validate(spec)
        async with self._admin():
            await asyncio.to_thread(self.ledger.save_tenant, name, parsed)
            self.ledger.apply_tenant(name, parsed)
        return {"name": name, **parsed.model_dump(mode="json")}

    async def list_tenants(self) -> list[dict]:
        return [{"name": n, **s.model_dump(mode="json")} for n, s in sorted(self.ledger.tenants.items())]

    async def usage(self, first_day: str, last_day: str, by: list[str]) -> list[dict]:
        await self.flush()  # what was settled until now is in the answer
        return await asyncio.to_thread(self.store.usage, first_day, last_day, tuple(by))

    async def budgets(self) -> list[dict]:
        return self.ledger.budgets()

    async def spend(self, scope: str, period: str) -> dict:
        return self.ledger.spend_of(scope, period)

    async def state(self) -> dict:
        return self.ledger.state()

    async def audit_rotate(self) -> dict:
        """Write what is pending, close the open segment and archive it now."""
        await self.flush()
        closed = await self.write_audit(rotate=True)
        if self._archive_task is not None:
            await asyncio.gather(self._archive_task, return_exceptions=True)
        archived = await self.archive()
        return {"closed": closed, "archived_now": archived, "last_seq": self.audit.seq if self.audit else 0}

    async def audit_tail(self, count: int) -> list[dict]:
        if self.audit is None:
            return []
        await self.flush()
        return await asyncio.to_thread(tail, self.audit.directory, count)

    def _admin(self) -> asyncio.Lock:
        """Admin changes (rare) write the store at once, on a worker thread, one at a time; the
        tables change on this event loop, after the write succeeded."""
        self._start()
        return self._write_lock

    # ---- background --------------------------------------------------------------------------------

    async def flush(self) -> None:
        async with self._write_lock:
            pending = self.ledger.take_flush()
            if pending:
                try:
                    await asyncio.to_thread(self.store.write, pending)
                except Exception:  # noqa: BLE001 - keep the changes and try again next time
                    logger.exception("ledger write failed; keeping %d spend change(s) for the next write",
                                     len(pending.spend))
                    self.ledger.restore_flush(pending)
        await self.write_audit()

    async def write_audit(self, rotate: bool = False) -> list[str]:
        """Write the pending audit records (and close the segment if asked or due); the segments
        this closed are archived in the background."""
        if self.audit is None:
            return []
        async with self._audit_lock:
            records, self._audit_pending = self._audit_pending, []
            if not records and not rotate and not self.audit.due():
                return []

            def write():
                closed = self.audit.write(records)
                return closed + (self.audit.rotate() if rotate else [])

            try:
                closed = await asyncio.to_thread(write)
            except Exception:  # noqa: BLE001 - keep them and try again next time
                logger.exception("audit write failed; keeping %d record(s) for the next write", len(records))
                self._audit_pending[:0] = records
                return []
        if closed:
            self._archive_soon()
        return [path.name for path in closed]

    def _archive_soon(self) -> None:
        if self.archiver is not None and (self._archive_task is None or self._archive_task.done()):
            self._archive_task = asyncio.get_running_loop().create_task(self.archive())

    async def archive(self) -> int:
        """Copy every closed, not yet archived segment to the archive (on a worker thread)."""
        if self.archiver is None:
            return 0
        try:
            done = await asyncio.to_thread(self.archiver.archive_closed, self.audit.directory)
            self._archive_failed_at = None
            return done
        except Exception as exc:  # noqa: BLE001 - tried again later; the segments stay on disk
            logger.warning("audit archive failed (tried again in %.0f s): %s", ARCHIVE_RETRY_S, exc)
            self._archive_failed_at = time.monotonic()
            return 0

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval_ms / 1000)
            await self.flush()

    async def _reap_loop(self) -> None:
        self._archive_soon()  # segments closed before a restart
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            if self._archive_failed_at is not None and time.monotonic() - self._archive_failed_at > ARCHIVE_RETRY_S:
                self._archive_soon()
            try:
                self.ledger.reap()
                self._publish_alerts()
            except Exception:  # noqa: BLE001 - the loop must live on
                logger.exception("ledger reaper failed")

    def _publish_alerts(self) -> None:
        if not self.ledger.alerts_out:
            return
        alerts, self.ledger.alerts_out = self.ledger.alerts_out, []
        for alert in alerts:
            logger.warning("budget alert %s", json.dumps(alert, sort_keys=True))
            self._alert_metric().inc(tags={"scope": alert["scope"], "threshold_pct": str(alert["threshold_pct"])})
            if self.settings.alert_webhook_url:
                task = asyncio.get_running_loop().create_task(self._post(alert))
                self._webhooks.add(task)
                task.add_done_callback(self._webhooks.discard)

    def _alert_metric(self):
        if self._alerts is None:
            from ray.util.metrics import Counter

            self._alerts = Counter("spillway_budget_alerts", description="Budget alerts fired, by scope and threshold.",
                                   tag_keys=("scope", "threshold_pct"))
        return self._alerts

    async def _post(self, alert: dict) -> None:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(self.settings.alert_webhook_url, json=alert) as resp:
                    if resp.status >= 300:
                        logger.warning("budget alert webhook answered %d", resp.status)
        except Exception as exc:  # noqa: BLE001 - an alert hook must never hurt the ledger
            logger.warning("budget alert webhook failed: %s", exc)

    async def close(self) -> None:
        """Write everything pending (spend, usage, audit records), then let go of the store."""
        for task in self._tasks:
            task.cancel()
        await self.port.close()
        await self.flush()
        if self._archive_task is not None:
            await asyncio.gather(self._archive_task, return_exceptions=True)
        self.store.close()


class LedgerDeployment(LedgerService):
    """What Serve runs: the service, closed by Serve's graceful shutdown (``__del__``)."""

    async def __del__(self):
        await self.close()


def _node_address() -> str:
    """This node's address in the Ray cluster (loopback outside one)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
