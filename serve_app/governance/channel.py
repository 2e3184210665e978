"""The ledger channel: one TCP connection per router replica to the ledger, for ``admit`` and ``sync``.

A Serve handle call costs this path about 10 ms per request on a loaded 2-core node (Serve's
request router, the replica's wrappers and thread hand-offs, two hops of Ray's RPC), and about a
millisecond of CPU in the two processes. Admission is the one ledger call on a keyed request's
path, and every router sends a settlement batch (with its audit records) every
``settle_batch_ms`` while it serves, so both take this socket; the rest (the key table, admin,
a batch too large for one frame) stays on the handle.

Wire format (both directions after the hello): a 4-byte big-endian length, then that many bytes
of JSON, one message per frame.
- hello, once per connection, from the router: ``SPWL`` and the port's 32-byte secret, compared
  in constant time; anything else closes the connection before a frame is read. The ledger makes
  the secret when it starts and gives it, with its address, only through ``endpoint()`` on its
  Serve handle, so only members of the Ray cluster can learn it;
- router to ledger: ``{"i": n, "admit": {AdmitRequest fields}}``, or ``{"i": n, "sync": {"router",
  "batch", "settlements": [Settlement fields], "voids": [...], "records": [...]}}``;
- ledger to router: ``{"i": n, "ok": {Admission fields}}`` or ``{"i": n, "no": {Denial fields}}``
  for an admission, ``{"i": n, "version": v}`` (the key table's) for a sync.
A frame over ``MAX_FRAME_BYTES`` or one that does not parse closes the connection.

Answers come back in the order the requests were sent (the ledger answers each frame as it reads
it, on its event loop), so one connection carries every admission of a router replica without
head-of-line waits beyond the ledger's own work (microseconds per admission).

Failure: a router that cannot connect uses the handle (slower, same answer) and tries the socket
again after ``RECONNECT_AFTER_S``. A request sent on a connection that then breaks or times out is
voided (``Ledger.void``: released if it was admitted, refused if it arrives later) and fails with
503, never admitted twice.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
import time
from dataclasses import asdict
from typing import Any, Callable

from serve_app.governance.ledger import Ledger
from serve_app.governance.messages import Admission, AdmitRequest, Denial, Settlement

logger = logging.getLogger("spillway.ledger")

HELLO = b"SPWL"
SECRET_BYTES = 32
LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 4 << 20  # a sync carries audit records; a larger batch goes through the handle
HELLO_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
RECONNECT_AFTER_S = 5.0
HIGH_WATER_BYTES = 256 * 1024


class ChannelBroken(Exception):
    """The request was sent and no answer will come: it must be voided, not sent again."""


def frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("a frame must hold a JSON object")
    return message


def settlement_from(fields: dict) -> Settlement:
    fields = dict(fields)
    fields["accounts"] = tuple(tuple(a) for a in fields.get("accounts", ()))
    return Settlement(**fields)


def answer_from(message: dict) -> Admission | Denial:
    if "ok" in message:
        ok = message["ok"]
        return Admission(ok["reservation"], ok["tenant"], ok["onprem_only"],
                         tuple(tuple(a) for a in ok["accounts"]), ok["cost"], ok["tokens"], ok["headers"])
    return Denial(**message["no"])


# (router, settlements, voids, audit records, batch number) -> the key table's version
SyncHandler = Callable[[str, list, tuple, list, "int | None"], int]


class LedgerPort:
    """The ledger's side: a TCP server on its node's address, answering ``admit`` and ``sync`` frames."""

    def __init__(self, ledger: Ledger, secret: bytes, sync: SyncHandler | None = None):
        self.ledger = ledger
        self.secret = secret
        self.sync = sync
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.address = (host, self._server.sockets[0].getsockname()[1])
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            hello = await asyncio.wait_for(reader.readexactly(len(HELLO) + SECRET_BYTES), HELLO_TIMEOUT_S)
            if hello[:len(HELLO)] != HELLO or not hmac.compare_digest(hello[len(HELLO):], self.secret):
                logger.warning("ledger port: refused a connection without the port's secret")
                return
            while True:
                message = await read_frame(reader)
                writer.write(frame(self._answer(message)))
                if writer.transport.get_write_buffer_size() > HIGH_WATER_BYTES:
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - a bad frame closes its connection, nothing else
            logger.warning("ledger port: closed a connection after a bad frame (%s)", type(exc).__name__)
        finally:
            self._connections.discard(writer)
            writer.close()

    def _answer(self, message: dict) -> dict:
        if "sync" in message and self.sync is not None:
            batch = message["sync"]
            number = batch.get("batch")
            version = self.sync(str(batch["router"]), [settlement_from(s) for s in batch["settlements"]],
                                tuple(str(v) for v in batch["voids"]), list(batch["records"]),
                                None if number is None else int(number))
            return {"i": message["i"], "version": version}
        request = AdmitRequest(**message["admit"])
        try:
            answer = self.ledger.admit(request)
        except Exception:  # noqa: BLE001 - this request fails closed; the connection carries others' answers
            logger.exception("ledger: admission %s failed", request.id)
            if request.id:
                self.ledger.void(request.router, request.id)  # (whatever it took before it failed)
            answer = Denial(503, "governance_unavailable", "The governance ledger could not decide on this request.",
                            2.0)
        if isinstance(answer, Admission):
            return {"i": message["i"], "ok": asdict(answer)}
        return {"i": message["i"], "no": asdict(answer)}


class LedgerChannel:
    """A router replica's side: one connection, many admissions in flight, matched by number."""

    def __init__(self, endpoint: Callable[[], Any], clock=time.monotonic):
        self._endpoint = endpoint  # async: (host, port, secret) of the ledger's port
        self._clock = clock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Task | None = None
        self._waiters: dict[int, asyncio.Future] = {}
        self._next = 0
        self._down_until = 0.0

    @property
    def usable(self) -> bool:
        return self._writer is not None or self._clock() >= self._down_until

    async def admit(self, request: AdmitRequest, timeout_s: float) -> Admission | Denial:
        """Raises ``ConnectionError`` if nothing was sent (the caller may use another way), or
        ``ChannelBroken`` if the request was sent and its answer is lost."""
        return answer_from(await self._call("admit", asdict(request), timeout_s))

    async def sync(self, router: str, batch: int | None, settlements: list[Settlement], voids: list[str],
                   records: list[dict], timeout_s: float) -> int:
        """The key table's version. Raises ``ConnectionError`` if nothing was sent (also for a batch
        over ``MAX_FRAME_BYTES``: send it through the handle), or ``ChannelBroken`` if it was sent and
        its answer is lost (the ledger may have applied it: send the same batch number again)."""
        body = {"router": router, "batch": batch, "settlements": [asdict(s) for s in settlements],
                "voids": list(voids), "records": records}
        return int((await self._call("sync", body, timeout_s))["version"])

    async def _call(self, kind: str, body: dict, timeout_s: float) -> dict:
        writer = await self._connection()
        self._next += 1
        number = self._next
        data = frame({"i": number, kind: body})
        if len(data) - LENGTH.size > MAX_FRAME_BYTES:
            raise ConnectionError(f"a {kind} frame of {len(data)} bytes is over the port's limit")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[number] = waiter
        try:
            writer.write(data)
            return await asyncio.wait_for(waiter, timeout_s)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            raise ChannelBroken(type(exc).__name__) from None
        finally:
            self._waiters.pop(number, None)

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._clock() < self._down_until:
            raise ConnectionError("the ledger's port failed recently")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        except Exception as exc:  # noqa: BLE001 - any failure: not sent
            raise ConnectionError(f"cannot reach the ledger's port ({type(exc).__name__}: {exc})") from None

    async def _connect(self) -> asyncio.StreamWriter:
        try:
            host, port, secret = await self._endpoint()
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except BaseException:
            self._down_until = self._clock() + RECONNECT_AFTER_S
            raise
        writer.write(HELLO + secret)
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer))
        return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                message = await read_frame(reader)
                waiter = self._waiters.get(message.get("i"))
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except Exception as exc:  # noqa: BLE001 - EOF, reset, a bad frame: the connection is over
            if not isinstance(exc, (asyncio.IncompleteReadError, ConnectionError)):
                logger.warning("ledger channel: bad frame from the ledger (%s)", type(exc).__name__)
        finally:
            if self._writer is writer:
                self._writer = None
                self._down_until = self._clock() + RECONNECT_AFTER_S
            writer.close()
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the ledger's connection closed"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
