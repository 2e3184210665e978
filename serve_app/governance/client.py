"""A router replica's side of the ledger (``service.py``).

- The key table, checked locally (hash and constant-time compare in ``keys.py``); re-read when the
  ledger's version changes (seen on every sync, at least every ``heartbeat_s`` or
  ``keys_refresh_s``, whichever is shorter). A key the table does not know yet is looked up once
  (at most ``LOOKUPS_PER_S`` per replica, so a flood of made-up keys costs the ledger nothing), so
  a new key works on every replica at once.
- ``admit``: one call per keyed request, over the ledger's admission port (``channel.py``; the
  Serve handle when the port cannot be reached); the ledger also re-checks that the key is still
  active, so a revocation holds from the next request on, on every replica. An admission whose
  answer is lost (timeout, broken connection) is voided in the next sync, never sent again.
- ``settle``: queued, sent in batches every ``settle_batch_ms`` (and a heartbeat every
  ``heartbeat_s`` without any), on this replica's event loop, over the same port (the handle when
  it cannot be reached, or for a batch over the port's frame limit). Batches are numbered: one
  whose answer was lost is sent again, alone and under its number, and the ledger applies it once
  (at most ``MAX_PENDING`` queued items; past that the oldest are logged and dropped).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from serve_app.config.governance import GovernanceConfig
from serve_app.governance.channel import ChannelBroken, LedgerChannel
from serve_app.governance.keys import KeyRecord, KeySpec, KeyTable, TenantSpec, parse_key
from serve_app.governance.messages import Admission, AdmitRequest, Denial, Settlement

logger = logging.getLogger("spillway.governance")

ADMIT_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
LOOKUPS_PER_S = 10.0
MAX_PENDING = 100_000
OPEN_WARNING = "no API keys exist: anyone who can reach this endpoint may use it (create one with 'spillway keys create')"


class LedgerUnavailable(Exception):
    pass


def table_from(data: dict) -> KeyTable:
    records = [KeyRecord(k["id"], k["hash"], KeySpec.model_validate(k["spec"]), k["created_at"], k["revoked_at"])
               for k in data["keys"]]
    table = KeyTable(records, data["version"])
    table.tenants = {n: TenantSpec.model_validate(s) for n, s in data["tenants"].items()}
    return table


class LedgerClient:
    def __init__(self, handle: Any, settings: GovernanceConfig, clock=time.monotonic):
        self.handle = handle
        self.settings = settings
        self.router_id = uuid.uuid4().hex[:12]
        self.clock = clock
        self.table: KeyTable | None = None
        self._pending: list[Settlement] = []
        self._voids: list[str] = []
        self._records: list[dict] = []
        self._batch = 0
        self._unacked: tuple[int, list[Settlement], list[str], list[dict]] | None = None  # sent, answer lost
        self._sync_lock = asyncio.Lock()
        self.channel = LedgerChannel(self._endpoint, clock)
        self._task: asyncio.Task | None = None
        self._loaded: asyncio.Event | None = None
        self._lookup_tokens = LOOKUPS_PER_S
        self._lookup_at = clock()
        self._refreshing: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._loaded = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self) -> KeyTable:
        """The key table, once read (fail closed: raises if the ledger cannot be reached in time)."""
        self.start()
        if self.table is None:
            try:
                await asyncio.wait_for(self._loaded.wait(), READY_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise LedgerUnavailable("the governance ledger has not answered yet") from None
        return self.table

    async def admit(self, request: AdmitRequest) -> Admission | Denial:
        """The ledger's answer (``request.id`` must be set: it names the reservation)."""
        if self.channel.usable:
            try:
                return await self.channel.admit(request, ADMIT_TIMEOUT_S)
            except ConnectionError:
                pass  # nothing was sent: ask through the handle
            except ChannelBroken as exc:
                self._void(request.id)
                raise LedgerUnavailable(f"the governance ledger's answer was lost ({exc})") from None
        try:
            return await asyncio.wait_for(self.handle.admit.remote(request), ADMIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._void(request.id)
            raise LedgerUnavailable("the governance ledger did not answer in time") from None
        except Exception as exc:  # noqa: BLE001 - any failure to reach it means: fail closed
            self._void(request.id)
            raise LedgerUnavailable(f"the governance ledger is unreachable ({type(exc).__name__})") from None

    def audit(self, record: dict) -> None:
        """A finished request's audit record: sent with the next settlement batch."""
        _queue(self._records, record, "audit record")

    def _void(self, reservation: str) -> None:
        _queue(self._voids, reservation, "void")  # past the bound, the ledger's reaper has them

    async def _endpoint(self) -> tuple[str, int, bytes]:
        data = await asyncio.wait_for(self.handle.endpoint.remote(), SYNC_TIMEOUT_S)
        if not data:
            raise ConnectionError("the ledger's admission port is not open")
        return data["host"], int(data["port"]), bytes.fromhex(data["secret"])

    def settle(self, settlement: Settlement) -> None:
        _queue(self._pending, settlement, "settlement")

    async def lookup(self, presented: str) -> KeyRecord | None:
        """A key this replica's table does not know: re-read the table (rate-limited), check again.
        Requests that arrive while a read is in flight wait for it instead of starting another."""
        parsed = parse_key(presented)
        if parsed is None or self.table is None:
            return None
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
            return self.table.check(presented)
        if parsed[0] in self.table.records:
            return None  # a known key with a wrong secret, or revoked
        now = self.clock()
        self._lookup_tokens = min(LOOKUPS_PER_S, self._lookup_tokens + (now - self._lookup_at) * LOOKUPS_PER_S)
        self._lookup_at = now
        if self._lookup_tokens < 1:
            return None
        self._lookup_tokens -= 1
        await self.refresh()
        return self.table.check(presented)

    async def refresh(self) -> None:
        """Re-read the key table (one read in flight per replica; callers share it)."""
        self.start()  # an admin call may be this replica's first
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._read_table())
        await asyncio.shield(self._refreshing)

    async def _read_table(self) -> None:
        data = await asyncio.wait_for(self.handle.key_table.remote(), SYNC_TIMEOUT_S)
        first = self.table is None
        self.table = table_from(data)
        self._loaded.set()
        if first and self.table.open:
            logger.warning("Spillway is open: %s", OPEN_WARNING)

    async def _run(self) -> None:
        while self.table is None and not self._closing:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the ledger may still be starting
                logger.warning("key table not readable yet: %s", exc)
                await asyncio.sleep(1.0)
        last_sync = self.clock()
        # Every sync answers with the ledger's version, and a moved version re-reads the key table.
        every_s = min(self.settings.heartbeat_s, self.settings.keys_refresh_s)
        # Stopped by ``close``: the flag as well as the cancellation, because Python 3.11's
        # ``wait_for`` can swallow a cancellation that lands as its inner call completes.
        while not self._closing:
            await asyncio.sleep(self.settings.settle_batch_ms / 1000)
            if not (self._unacked or self._waiting()) and \
                    self.clock() - last_sync < every_s:
                continue
            try:
                await self.sync()
                last_sync = self.clock()
            except Exception as exc:  # noqa: BLE001 - kept and sent again
                logger.warning("ledger sync failed (%d settlement(s) kept): %s", self._queued(), exc)

    async def sync(self) -> None:
        """Send what is queued (a heartbeat when nothing is); first, alone, a batch whose answer
        was lost. Raises when a batch could not be delivered; it stays for the next sync."""
        async with self._sync_lock:
            if self._unacked is not None:
                await self._deliver()
                if not self._waiting():
                    return
            if not self._waiting():
                await self._follow(await self._send(None, [], [], []))  # a heartbeat: nothing to number
                return
            self._batch += 1
            self._unacked = (self._batch, self._pending, self._voids, self._records)
            self._pending, self._voids, self._records = [], [], []
            await self._deliver()

    async def _deliver(self) -> None:
        version = await self._send(*self._unacked)
        self._unacked = None
        await self._follow(version)

    async def _follow(self, version: int) -> None:
        """Re-read the key table when the ledger's version moved."""
        if self.table is None or version != self.table.version:
            await self.refresh()

    async def _send(self, batch: int | None, settlements: list[Settlement], voids: list[str], records: list[dict]) -> int:
        if self.channel.usable:
            try:
                return await self.channel.sync(self.router_id, batch, settlements, voids, records, SYNC_TIMEOUT_S)
            except ConnectionError:
                pass  # nothing was sent: through the handle
            except ChannelBroken as exc:
                raise LedgerUnavailable(f"a settlement batch's answer was lost ({exc}); sent again next") from None
        return await asyncio.wait_for(
            self.handle.sync.remote(self.router_id, settlements, tuple(voids), records, batch), SYNC_TIMEOUT_S)

    async def close(self) -> None:
        self._closing = True
        await self.channel.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=SYNC_TIMEOUT_S + 1)
        if self._unacked is not None or self._waiting():
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - nothing more to do at shutdown
                logger.error("could not send %d settlement(s) at shutdown: %s", self._queued(), exc)

    def _waiting(self) -> bool:
        """Anything queued for the next batch."""
        return bool(self._pending or self._voids or self._records)

    def _queued(self) -> int:
        return len(self._pending) + (len(self._unacked[1]) if self._unacked is not None else 0)


def _queue(queue: list, item, what: str) -> None:
    """Append to a queue for the next sync; past ``MAX_PENDING`` (the ledger unreachable for long)
    the oldest are logged and dropped."""
    queue.append(item)
    if len(queue) > MAX_PENDING:
        dropped = len(queue) - MAX_PENDING
        del queue[:dropped]
        logger.error("ledger unreachable: dropped the %d oldest unsent %s(s)", dropped, what)
