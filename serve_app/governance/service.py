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

from serve_app.config import SpillwayConfig
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
        logger.info("ledger started on %s: %d key(s), %d tenant(s)", self.store.describe(),
                    len(self.ledger.keys), len(self.ledger.tenants))

    def _start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._flush_loop()), loop.create_task(self._reap_loop())]

    async def check_health(self) -> None:
        self._start()

    # ---- the routers' calls ------------------------------------------------------------------------

    async def admit(self, request: AdmitRequest):
        self._start()
        return self.ledger.admit(request)

    async def sync(self, router: str, settlements: list[Settlement]) -> int:
        """A router's batch of finished requests (possibly none: a heartbeat). Returns the key-table
        version, so routers re-read the table when it changed."""
        self._start()
        self.ledger.heartbeat(router)
        for settlement in settlements:
            self.ledger.settle(settlement)
        self._publish_alerts()
        return self.ledger.version

    async def key_table(self) -> dict:
        self._start()
        return self.ledger.key_table()

    # ---- admin -------------------------------------------------------------------------------------

    async def create_key(self, spec: dict) -> dict:
        record, plaintext = await self._admin(lambda: self.ledger.create_key(KeySpec.model_validate(spec)))
        return {**record.public(), "key": plaintext}

    async def rotate_key(self, key_id: str) -> dict | None:
        created = await self._admin(lambda: self.ledger.rotate_key(key_id))
        if created is None:
            return None
        record, plaintext = created
        return {**record.public(), "key": plaintext, "replaces": key_id}

    async def revoke_key(self, key_id: str) -> dict | None:
        record = await self._admin(lambda: self.ledger.revoke_key(key_id))
        return None if record is None else record.public()

    async def list_keys(self) -> list[dict]:
        return [r.public() for r in self.ledger.keys.values()]

    async def set_tenant(self, name: str, spec: dict) -> dict:
        parsed = TenantSpec.model_validate(spec)
        await self._admin(lambda: self.ledger.set_tenant(name, parsed))
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

    async def _admin(self, change):
        """Admin changes write to the store at once (rare; on a worker thread)."""
        self._start()
        async with self._write_lock:
            return await asyncio.to_thread(change)

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
        await self.flush()
        self.store.close()

