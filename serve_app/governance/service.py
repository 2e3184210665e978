"""The ledger as a Serve deployment: one replica per cluster, on the router's (on-prem) site.

It owns the ``Ledger`` (``ledger.py``), writes its changes to the store every
``flush_interval_ms`` on a worker thread (never on its event loop), charges the reservations of
router replicas that went silent, and turns budget alerts into a metric, a structured log line
and an optional webhook POST. Serve restarts it if it dies; it reloads from the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from serve_app.config import SpillwayConfig
from serve_app.governance.channel import SECRET_BYTES, LedgerPort
from serve_app.governance.keys import KeySpec, TenantSpec
from serve_app.governance.ledger import AdmitRequest, Ledger, Settlement
from serve_app.governance.store import open_store

logger = logging.getLogger("spillway.ledger")
REAP_EVERY_S = 1.0
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
        self.port = LedgerPort(self.ledger, secrets.token_bytes(SECRET_BYTES))
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

    async def sync(self, router: str, settlements: list[Settlement], voids: tuple[str, ...] = ()) -> int:
        """A router's batch of finished requests (possibly none: a heartbeat) and of admissions
        whose answer it never got. Returns the key-table version, so routers re-read the table
        when it changed."""
        self._start()
        self.ledger.heartbeat(router)
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

    def _admin(self) -> asyncio.Lock:
        """Admin changes (rare) write the store at once, on a worker thread, one at a time; the
        tables change on this event loop, after the write succeeded."""
        self._start()
        return self._write_lock

    # ---- background --------------------------------------------------------------------------------

    async def flush(self) -> None:
        async with self._write_lock:
            pending = self.ledger.take_flush()
            if not pending:
                return
            try:
                await asyncio.to_thread(self.store.write, pending)
            except Exception:  # noqa: BLE001 - keep the changes and try again next time
                logger.exception("ledger write failed; keeping %d spend change(s) for the next write",
                                 len(pending.spend))
                self.ledger.restore_flush(pending)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval_ms / 1000)
            await self.flush()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
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

    async def __del__(self):
        for task in self._tasks:
            task.cancel()
        await self.port.close()
        await self.flush()
        self.store.close()



def _node_address() -> str:
    """This node's address in the Ray cluster (loopback outside one)."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
