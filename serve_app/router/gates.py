"""Direct requests from the router to engine replicas, past Ray's per-call path.

Opening a request with a Ray Serve call costs a task submission in the router, a task in the
engine replica and a streamed reply back: about 4-5 ms per request on a quiet 2-core machine and
much more under load, on the cores the engine needs. Each engine replica also serves whole requests
on its stream server (deployments/stream_server.py) and lists its address in Ray's KV store; the
router keeps a small pool of connections per replica and writes the request there, with the
cluster's secret (also in the KV store) that the replica requires.

Serve stays in charge of what it is good at: it places, restarts and replaces replicas, and it is
the fallback path. A replica the router does not know yet, one that refuses connections, or one
that answers "retry" (draining, or not the deployment it was) costs nothing but the attempt: the
request then goes through the Serve call as before. Only failures before the reply's header fall
back; once a stream has started, its bytes are the client's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger("spillway.router.gates")

DOWN_FOR_S = 5.0  # a replica that asked to retry elsewhere is skipped this long
CONNECT_TIMEOUT_S = 2.0
MAX_IDLE_PER_GATE = 64


class GateUnavailable(Exception):
    """The replica could not take the request; nothing was started (send it another way).
    ``gone``: nothing listens at its address (a replica that died without leaving the list)."""

    def __init__(self, message: str, gone: bool = False):
        super().__init__(message)
        self.gone = gone


@dataclass
class EngineStream:
    """The router's end of an engine's direct token stream. A claimed stream (Serve-call path)
    holds that ``call``, which keeps the request counted on its replica until the stream is over;
    closing the socket ends both. A direct request's stream has ``release`` instead, which returns
    the connection to its pool when the stream ended cleanly (``[DONE]``) and closes it otherwise
    (which aborts the request in the engine). Closing twice does nothing."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    call: Any = None
    release: Callable[[bool], None] | None = None
    closed: bool = False

    def close(self, reusable: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.release is not None:
            self.release(reusable)
        elif not self.writer.is_closing():
            self.writer.close()


@dataclass
class Gate:
    """One engine replica's direct address, its idle connections and this router's load on it."""

    replica: str
    host: str
    port: int
    secret: str = ""
    in_flight: int = 0
    down_until: float = 0.0
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    async def request(self, deployment: str, endpoint: str, body: dict, request_id: str,
                      trace_headers: dict | None, timeout_s: float) -> tuple[int, str, str | EngineStream]:
        """Send one request; ``(status, replica, body or stream)``. Raises GateUnavailable when
        nothing was started, asyncio.TimeoutError when the engine took longer than ``timeout_s``
        to answer (the request is then aborted)."""
        frame = json.dumps({"secret": self.secret, "deployment": deployment, "endpoint": endpoint, "body": body,
                            "request_id": request_id, "trace_headers": trace_headers},
                           separators=(",", ":")).encode() + b"\n"
        self.in_flight += 1
        try:
            reader, writer, header = await self._send(frame, timeout_s)
        except BaseException:
            self.in_flight -= 1
            raise
        status, replica = header["status"], header.get("replica", self.replica)
        if "length" not in header:
            return status, replica, EngineStream(reader, writer,
                                                 release=lambda reusable: self._done(reader, writer, reusable))
        try:
            data = await asyncio.wait_for(reader.readexactly(header["length"]), timeout=timeout_s)
        except BaseException:
            self._done(reader, writer, False)
            raise
        self._done(reader, writer, True)
        return status, replica, data.decode()

    async def _send(self, frame: bytes, timeout_s: float):
        # A pooled connection may have been closed by the engine since (restart, idle close): one
        # more try on a fresh connection before giving up on this replica.
        while True:
            pooled = self._take_idle()
            if pooled is not None:
                reader, writer = pooled
            else:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                            timeout=min(timeout_s, CONNECT_TIMEOUT_S))
                except (OSError, asyncio.TimeoutError) as exc:
                    self.down_until = time.monotonic() + DOWN_FOR_S
                    raise GateUnavailable(f"{self.host}:{self.port}: {exc!r}", gone=True) from exc
            try:
                writer.write(frame)
                line = await asyncio.wait_for(reader.readline(), timeout=timeout_s)
            except asyncio.TimeoutError:  # (an OSError since 3.11: the engine is slow, not gone)
                writer.close()
                raise
            except (OSError, EOFError) as exc:
                writer.close()
                if pooled is not None:
                    continue
                raise GateUnavailable(f"{self.host}:{self.port}: {exc!r}") from exc
            except BaseException:
                writer.close()
                raise
            if not line:
                writer.close()
                if pooled is not None:
                    continue
                raise GateUnavailable(f"{self.host}:{self.port}: closed before answering")
            header = json.loads(line)
            if header.get("retry"):
                writer.close()
                self.down_until = time.monotonic() + DOWN_FOR_S
                raise GateUnavailable(f"{self.host}:{self.port}: replica asked to retry elsewhere (draining)")
            return reader, writer, header

    def _take_idle(self):
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    def _done(self, reader, writer, reusable: bool) -> None:
        self.in_flight -= 1
        if reusable and len(self.idle) < MAX_IDLE_PER_GATE and not writer.is_closing():
            self.idle.append((reader, writer))
        else:
            writer.close()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class GateDirectory:
    """The engine replicas this router can reach directly, per deployment (refreshed from Ray's KV)."""

    def __init__(self, lister: Callable[[str, str], list[tuple[str, str, int, bytes]]] | None = None,
                 remover: Callable[[str, str, str, str, int], None] | None = None,
                 secret: Callable[[], str] | None = None, stale_after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        from deployments import stream_server

        self._lister = lister or stream_server.list_gates
        self._remover = remover or stream_server.unregister_gate_address
        self._secret_source = secret or stream_server.cluster_secret
        self._stale_after_s = stream_server.STALE_AFTER_S if stale_after_s is None else stale_after_s
        self._clock = clock
        self._secret: str | None = None
        self._gates: dict[tuple[str, str], dict[str, Gate]] = {}
        # (app, deployment) -> {(replica, host, port): (last heartbeat stamp, when it last changed)}
        self._beats: dict[tuple[str, str], dict[tuple[str, str, int], tuple[bytes, float]]] = {}
        self.expired = 0
        self.direct = 0
        self.fallback = 0

    def watch(self, app: str, deployment: str) -> None:
        self._gates.setdefault((app, deployment), {})

    def refresh(self) -> None:
        """Sync: call it off the event loop (it asks the GCS)."""
        if self._secret is None:
            try:
                self._secret = self._secret_source()
            except Exception as exc:  # noqa: BLE001 - no direct requests until the GCS answers
                logger.warning("could not read the cluster's secret for direct requests: %r", exc)
                return
        for key in list(self._gates):
            try:
                listed = self._lister(*key)
            except Exception as exc:  # noqa: BLE001 - keep what we know until the GCS answers
                logger.warning("could not list engine replicas of %s: %r", key[1], exc)
                continue
            self._apply(key, listed)

    def _apply(self, key: tuple[str, str], listed: list[tuple[str, str, int, bytes]]) -> None:
        current = self._gates[key]
        fresh: dict[str, Gate] = {}
        for replica, host, port in self._live(key, listed):
            gate = current.get(replica)
            if gate is None or (gate.host, gate.port) != (host, port):
                gate = Gate(replica, host, port, self._secret)
            fresh[replica] = gate
        for replica, gate in current.items():
            if fresh.get(replica) is not gate:
                gate.close()  # gone (idle connections only; running streams finish on their own)
        self._gates[key] = fresh

    def _live(self, key: tuple[str, str], listed: list[tuple[str, str, int, bytes]]) -> list[tuple[str, str, int]]:
        """The listed replicas whose heartbeat stamp changed within ``stale_after_s`` (one first
        seen counts from then). The others died without leaving the list: removed from it."""
        now, seen = self._clock(), self._beats.get(key, {})
        beats, live = {}, []
        for replica, host, port, stamp in listed:
            address = (replica, host, port)
            last = seen.get(address)
            beats[address] = last if last is not None and last[0] == stamp else (stamp, now)
            if now - beats[address][1] <= self._stale_after_s:
                live.append(address)
                continue
            logger.warning("replica %s of %s at %s:%d stopped its heartbeat; dropping it", replica, key[1], host, port)
            try:
                self._remover(key[0], key[1], replica, host, port)
            except Exception as exc:  # noqa: BLE001 - still stale at the next refresh: removed then
                logger.warning("could not remove %s of %s from the replica list: %r", replica, key[1], exc)
                continue
            self.expired += 1
            del beats[address]
        self._beats[key] = beats
        return live

    def forget(self, app: str, deployment: str, gate: Gate) -> None:
        """Drop a replica nothing listens for any more, here and from the shared list (sync: call
        it off the event loop). A live replica lists itself again within seconds if this was wrong."""
        gates = self._gates.get((app, deployment), {})
        if gates.get(gate.replica) is gate:
            del gates[gate.replica]
        gate.close()
        try:
            self._remover(app, deployment, gate.replica, gate.host, gate.port)
        except Exception as exc:  # noqa: BLE001 - the next refresh shows it again; it is skipped while down
            logger.warning("could not remove %s of %s from the replica list: %r", gate.replica, deployment, exc)

    def pick(self, app: str, deployment: str) -> Gate | None:
        """The replica with the fewest of this router's requests (ties at random), skipping ones
        that recently refused; None when there is none (then use the Serve call)."""
        now = time.monotonic()
        gates = [g for g in self._gates.get((app, deployment), {}).values() if g.down_until <= now]
        if not gates:
            return None
        least = min(g.in_flight for g in gates)
        return random.choice([g for g in gates if g.in_flight == least])

    def report(self) -> dict[str, Any]:
        return {
            "direct_requests": self.direct,
            "serve_call_requests": self.fallback,
            "expired_replicas": self.expired,
            "replicas": {deployment: sorted(gates) for (_, deployment), gates in self._gates.items()},
        }
