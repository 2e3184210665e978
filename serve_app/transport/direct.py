"""Direct requests from the router to engine replicas, past Ray's per-call path.

Opening a request with a Ray Serve call costs a task submission in the router, a task in the
engine replica and a streamed reply back: about 4-5 ms per request on a quiet 2-core machine and
much more under load, on the cores the engine needs. Each engine replica therefore serves requests
on its own port (``deployments/stream_server.py``) and lists its address in Ray's KV store; the
router keeps a few pooled connections per replica and writes a frame per request. A replica on the
same machine is reached over its Unix socket instead (``discovery.local_socket_path``), TCP
being the fallback if that socket refuses.

A ``Gate`` is one replica: its address, its pool, this router's requests on it, and its health (a
replica that failed a request is held out until ``down_until``). The ``GateDirectory`` is the set of
gates per deployment. Its refresh reads the KV store in a worker thread and returns plain data;
the event loop applies it, so no state the loop uses is ever changed from a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from deployments import wire
from serve_app.transport.base import EngineReply, EngineRequest, EngineStream, TransportError
from serve_app.transport.streams import open_stream, open_unix_stream

logger = logging.getLogger("spillway.transport.direct")

CONNECT_TIMEOUT_S = 2.0
MAX_IDLE_PER_GATE = 64
SKIP_AFTER_REFUSAL_S = 5.0  # a replica that asked to retry elsewhere (draining) is skipped this long


class GateFull(Exception):
    """The replica runs ``max_num_seqs`` sequences already; nothing was started."""


class GateUnavailable(Exception):
    """The replica refused before anything started (draining, another deployment, or nothing
    listens: ``gone``); send the request another way. Not a failure of the request."""

    def __init__(self, message: str, gone: bool = False):
        super().__init__(message)
        self.gone = gone


@dataclass
class Gate:
    """One engine replica's port, its idle connections and this router's load on it."""

    replica: str
    host: str
    port: int
    secret: bytes
    idle_timeout_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    local_socket: str | None = None  # the replica's Unix socket, when it runs on this machine
    in_flight: int = 0
    down_until: float = 0.0
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = field(default_factory=list)

    def available(self, now: float) -> bool:
        return self.down_until <= now

    async def request(self, deployment: str, request: EngineRequest, timeout_s: float) -> EngineReply:
        """Send one request. Raises ``GateUnavailable`` when nothing was started, ``TransportError``
        when the replica failed to accept it within ``timeout_s`` or broke before answering."""
        meta = {"deployment": deployment, "endpoint": request.endpoint, "request_id": request.request_id,
                "trace_headers": request.trace_headers, "sequences": request.sequences}
        frame = wire.pack(wire.KIND_REQUEST, self.secret, wire.request_payload(meta, request.body))
        self.in_flight += 1
        try:
            reader, writer, header = await self._send(frame, timeout_s)
        except BaseException:
            self.in_flight -= 1
            raise
        if header.get("full"):
            self._done(reader, writer, True)
            raise GateFull(f"{self.replica} is full")
        try:
            if header.get("accepted"):
                header = await self._result_header(reader)  # generation: bounded by the client, not a timeout
            status, replica = int(header["status"]), str(header.get("replica", self.replica))
            if "length" not in header:
                # Failures are held against this gate's replica (its key in the shared list).
                return EngineReply(status, replica, stream=EngineStream(
                    reader, writer, self.replica, release=lambda reusable: self._done(reader, writer, reusable)))
            async with asyncio.timeout(timeout_s):
                body = await reader.readexactly(int(header["length"]))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, KeyError) as exc:
            self._done(reader, writer, False)
            raise TransportError(f"{self.host}:{self.port}: broke before answering: {exc!r}", self.replica) from exc
        except BaseException:
            self._done(reader, writer, False)  # closing the connection aborts the request in the engine
            raise
        self._done(reader, writer, True)
        return EngineReply(status, replica, body=body)

    async def stats(self, timeout_s: float, after: int | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        """The replica's live load, over a pooled connection. With ``after`` (the ``releases``
        count of its last report), the engine answers once sequences were released since, or
        after ``wait_s``."""
        payload = b"" if after is None else json.dumps({"after": after, "wait_ms": wait_s * 1000}).encode()
        reader, writer, header = await self._send(wire.pack(wire.KIND_STATS, self.secret, payload), timeout_s + wait_s)
        try:
            async with asyncio.timeout(timeout_s):
                data = await reader.readexactly(int(header["length"]))
        except BaseException:
            writer.close()
            raise
        self._pool(reader, writer)
        return json.loads(data)

    async def _result_header(self, reader: asyncio.StreamReader) -> dict:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before the result")
        return json.loads(line)

    async def _send(self, frame: bytes, timeout_s: float):
        # A pooled connection may have been closed by the engine since (restart, idle timeout): one
        # more try on a fresh connection before giving up on this replica.
        while True:
            pooled = self._take_idle()
            if pooled is not None:
                reader, writer = pooled
            else:
                try:
                    async with asyncio.timeout(min(timeout_s, CONNECT_TIMEOUT_S)):
                        reader, writer = await self._connect()
                except (OSError, asyncio.TimeoutError) as exc:
                    raise GateUnavailable(f"{self.host}:{self.port}: {exc!r}", gone=True) from exc
            try:
                writer.write(frame)
                async with asyncio.timeout(timeout_s):
                    line = await reader.readline()
            except asyncio.TimeoutError as exc:
                writer.close()
                raise TransportError(f"{self.host}:{self.port}: no answer within {timeout_s:.0f}s", self.replica) from exc
            except (OSError, EOFError, ValueError) as exc:
                writer.close()
                if pooled is not None:
                    continue
                raise TransportError(f"{self.host}:{self.port}: {exc!r}", self.replica) from exc
            except BaseException:
                writer.close()
                raise
            if not line:
                writer.close()
                if pooled is not None:
                    continue  # the engine had closed it (idle timeout, restart) before our frame
                raise TransportError(f"{self.host}:{self.port}: closed before answering", self.replica)
            try:
                header = json.loads(line)
            except ValueError as exc:
                writer.close()
                raise TransportError(f"{self.host}:{self.port}: unreadable answer", self.replica) from exc
            if header.get("retry"):
                writer.close()
                self.down_until = self.clock() + SKIP_AFTER_REFUSAL_S
                raise GateUnavailable(f"{self.host}:{self.port}: replica asked to retry elsewhere (draining)")
            return reader, writer, header

    async def _connect(self):
        if self.local_socket is not None:
            try:
                return await open_unix_stream(self.local_socket)
            except OSError as exc:
                logger.info("replica %s: its local socket refused (%r); TCP from now on", self.replica, exc)
                self.local_socket = None
        return await open_stream(self.host, self.port)

    def _take_idle(self):
        now = self.clock()
        while self.idle:
            reader, writer, since = self.idle.pop()
            # The engine closes connections idle past its timeout: never reuse one near that age.
            if not writer.is_closing() and not reader.at_eof() and now - since < self.idle_timeout_s / 2:
                return reader, writer
            writer.close()
        return None

    def _pool(self, reader, writer) -> None:
        if len(self.idle) < MAX_IDLE_PER_GATE and not writer.is_closing():
            self.idle.append((reader, writer, self.clock()))
        else:
            writer.close()

    def _done(self, reader, writer, reusable: bool) -> None:
        self.in_flight -= 1
        if reusable:
            self._pool(reader, writer)
        else:
            writer.close()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


Listing = list[tuple[str, str, int, bytes]]  # (replica, host, port, heartbeat stamp)


@dataclass
class Snapshot:
    """What one refresh read from Ray's KV store (in a worker thread)."""

    secret: str | None
    listings: dict[tuple[str, str], Listing]
    local_sockets: dict[tuple[str, int], str | None] = field(default_factory=dict)  # (host, port) -> path


class GateDirectory:
    """The engine replicas this router can reach directly, per (app, deployment)."""

    def __init__(self, lister: Callable[[str, str], Listing] | None = None,
                 remover: Callable[[str, str, str, str, int], None] | None = None,
                 secret: Callable[[], str] | None = None, stale_after_s: float | None = None,
                 idle_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 local_socket: Callable[[str, int], str | None] | None = None):
        from deployments import discovery

        self._lister = lister or discovery.list_gates
        self._remover = remover or discovery.unregister_gate_address
        self._secret_source = secret or discovery.cluster_secret
        self._local_socket = local_socket or discovery.reachable_local_socket
        self._stale_after_s = discovery.STALE_AFTER_S if stale_after_s is None else stale_after_s
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.secret: bytes | None = None
        self._gates: dict[tuple[str, str], dict[str, Gate]] = {}
        # (app, deployment) -> {(replica, host, port): (last heartbeat stamp, when it last changed)}
        self._beats: dict[tuple[str, str], dict[tuple[str, str, int], tuple[bytes, float]]] = {}
        self.expired = 0
        self.direct = 0
        self.fallback = 0

    def watch(self, app: str, deployment: str) -> None:
        self._gates.setdefault((app, deployment), {})

    # ---- refresh: fetch in a thread, apply on the loop ------------------------------------------

    def fetch(self) -> Snapshot:
        """Blocking GCS reads; run in a worker thread. Touches no state of the directory."""
        secret = None
        if self.secret is None:
            try:
                secret = self._secret_source()
            except Exception as exc:  # noqa: BLE001 - no direct requests until the GCS answers
                logger.warning("could not read the cluster's secret for direct requests: %r", exc)
        listings, local_sockets = {}, {}
        for key in list(self._gates):
            try:
                listings[key] = self._lister(*key)
            except Exception as exc:  # noqa: BLE001 - keep what we know until the GCS answers
                logger.warning("could not list engine replicas of %s: %r", key[1], exc)
                continue
            for _, host, port, _ in listings[key]:
                try:
                    local_sockets[(host, port)] = self._local_socket(host, port)
                except Exception:  # noqa: BLE001 - TCP then
                    local_sockets[(host, port)] = None
        return Snapshot(secret, listings, local_sockets)

    def apply(self, snapshot: Snapshot) -> list[tuple[str, str, str, str, int]]:
        """Fold a snapshot in (on the event loop). Returns the stale entries to remove from the
        shared list (the caller does that off the loop)."""
        if snapshot.secret is not None and self.secret is None:
            from deployments.wire import secret_bytes

            self.secret = secret_bytes(snapshot.secret)
        if self.secret is None:
            return []
        stale = []
        for key, listed in snapshot.listings.items():
            live, dead = self._live(key, listed)
            stale += [(key[0], key[1], *address) for address in dead]
            current = self._gates.get(key, {})
            fresh: dict[str, Gate] = {}
            for replica, host, port in live:
                gate = current.get(replica)
                if gate is None or (gate.host, gate.port) != (host, port):
                    gate = Gate(replica, host, port, self.secret, self._idle_timeout_s, self._clock,
                                local_socket=snapshot.local_sockets.get((host, port)))
                fresh[replica] = gate
            for replica, gate in current.items():
                if fresh.get(replica) is not gate:
                    gate.close()  # gone (idle connections only; running streams finish on their own)
            self._gates[key] = fresh
        return stale

    def _live(self, key: tuple[str, str], listed: Listing):
        """Listed replicas whose heartbeat stamp changed within ``stale_after_s`` (one first seen
        counts from then), and the others: they died without leaving the list."""
        now, seen = self._clock(), self._beats.get(key, {})
        beats, live, dead = {}, [], []
        for replica, host, port, stamp in listed:
            address = (replica, host, port)
            last = seen.get(address)
            beats[address] = last if last is not None and last[0] == stamp else (stamp, now)
            if now - beats[address][1] <= self._stale_after_s:
                live.append(address)
            else:
                logger.warning("replica %s of %s at %s:%d stopped its heartbeat; dropping it", replica, key[1], host, port)
                dead.append(address)
                self.expired += 1
                del beats[address]
        self._beats[key] = beats
        return live, dead

    def remove(self, entries: list[tuple[str, str, str, str, int]]) -> None:
        """Blocking: remove entries from the shared list (worker thread). A live replica lists
        itself again within seconds if this was wrong."""
        for entry in entries:
            try:
                self._remover(*entry)
            except Exception as exc:  # noqa: BLE001 - still stale at the next refresh: removed then
                logger.warning("could not remove %s from the replica list: %r", entry, exc)

    def forget(self, app: str, deployment: str, gate: Gate) -> list[tuple[str, str, str, str, int]]:
        """Drop a replica nothing listens for any more (on the loop); returns the entry to remove
        from the shared list off the loop."""
        gates = self._gates.get((app, deployment), {})
        if gates.get(gate.replica) is gate:
            del gates[gate.replica]
        gate.close()
        return [(app, deployment, gate.replica, gate.host, gate.port)]

    # ---- use -----------------------------------------------------------------------------------

    def gates(self, app: str, deployment: str) -> list[Gate]:
        return list(self._gates.get((app, deployment), {}).values())

    def pick(self, app: str, deployment: str, skip: frozenset[str] = frozenset()) -> Gate | None:
        """The available replica with the fewest of this router's requests (ties at random); None
        when there is none (then use the Serve call)."""
        now = self._clock()
        gates = [g for g in self.gates(app, deployment) if g.available(now) and g.replica not in skip]
        if not gates:
            return None
        least = min(g.in_flight for g in gates)
        return random.choice([g for g in gates if g.in_flight == least])

    def close(self) -> None:
        for gates in self._gates.values():
            for gate in gates.values():
                gate.close()

    def report(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "direct_requests": self.direct,
            "serve_call_requests": self.fallback,
            "expired_replicas": self.expired,
            "replicas": {deployment: sorted(gates) for (_, deployment), gates in self._gates.items()},
            "down": {deployment: sorted(r for r, g in gates.items() if not g.available(now))
                     for (_, deployment), gates in self._gates.items()},
            "local_socket": {deployment: sorted(r for r, g in gates.items() if g.local_socket)
                             for (_, deployment), gates in self._gates.items()},
        }
