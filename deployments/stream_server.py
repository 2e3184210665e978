"""Direct token streams from an engine replica to the router, off Ray's per-item path.

A Ray Serve streaming call moves every SSE event as its own Ray object: serialised in the engine
replica, shipped, deserialised in the router. For a 64-token answer that is 66 round trips through
Ray's core worker per request, on the same cores that run the engine. Instead, the router opens
the request with ``EngineReplica.open``, a Serve call whose first item is the reply; for a stream
the replica parks the event iterator under a random token and answers with its stream address, and
the call then stays open, carrying nothing, until the stream is over (so Serve's ongoing-request
count, replica choice and graceful drain see the stream as before). The router connects to
that address over TCP, sends the token, and reads the SSE bytes as the engine writes them. When the
router is behind, one read returns several events (coalesced by the socket, never by a timer).

The engine starts at once: parking pulls the stream's first event in the background (vLLM adds the
request to its scheduler on the iterator's first step), so prefill runs while the reply travels
to the router and the router connects, instead of after.

Lifecycle: a parked stream not claimed within ``claim_timeout_s`` is closed (vLLM aborts the
request). A router that disconnects makes the next write fail, which closes the iterator (vLLM
aborts). The token is 128 random bits and is single use.

Direct requests (the router's fast path, serve_app/router/gates.py): the same server also takes
whole requests, skipping the Ray call. A router keeps connections to each engine replica it knows
(replicas list their address in Ray's KV store, ``register``) and writes one request per line, a
JSON frame ``{"secret", "deployment", "endpoint", "body", "request_id", "trace_headers"}``. The secret
is the cluster's (``cluster_secret``, in Ray's KV store): only a member of the Ray cluster can read
it, so a peer that can merely reach the port cannot skip the router's keys, limits and residency;
a frame without it gets the connection closed. The reply is a JSON
header line ``{"status", "replica", "length"}`` followed by ``length`` bytes of body, or, for a
stream, a header without ``length`` followed by the SSE events; a stream ends at
``data: [DONE]`` (the connection then takes the next request) or, when the engine fails, at the
connection's close. A replica that is draining, or is not the deployment the frame names, answers
``{"status": 503, "retry": true}`` and the router sends the request the other way (through Serve).
A router that closes the connection mid-stream aborts the request, as above.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Awaitable, Callable

logger = logging.getLogger("spillway.engine.stream")

TOKEN_BYTES = 16
CLAIM_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
DONE_EVENT = b"data: [DONE]\n\n"
FRAME_LIMIT_BYTES = 64 << 20  # one request line; the router caps bodies far below (max_body_bytes)
KV_NAMESPACE = "spillway_gates"

# (endpoint, body, request_id, trace_headers) -> an object with status, replica, body | events
RequestHandler = Callable[[str, dict, str, "dict | None"], Awaitable[Any]]


class _Parked:
    """A stream waiting for its router, its first event already on the way."""

    __slots__ = ("events", "on_done", "first")

    def __init__(self, events: AsyncIterator[str], on_done: Callable[[], None]):
        self.events = events
        self.on_done = on_done
        self.first: asyncio.Future[str | None] = asyncio.ensure_future(_next_event(events))


async def _next_event(events: AsyncIterator[str]) -> str | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


class StreamServer:
    def __init__(self, claim_timeout_s: float = CLAIM_TIMEOUT_S, deployment: str | None = None,
                 handler: RequestHandler | None = None, secret: str | None = None):
        self._claim_timeout_s = claim_timeout_s
        self._parked: dict[str, _Parked] = {}
        self._server: asyncio.base_events.Server | None = None
        self._deployment = deployment
        self._handler = handler
        self._secret = secret
        self._direct_active = 0
        self._direct_idle = asyncio.Event()
        self._direct_idle.set()
        self.draining = False
        self.host: str | None = None
        self.port: int | None = None

    async def start(self, host: str, bind: str = "0.0.0.0") -> None:
        self._server = await asyncio.start_server(self._serve, bind, 0, limit=FRAME_LIMIT_BYTES)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    def park(self, events: AsyncIterator[str], on_done: Callable[[], None] = lambda: None) -> str:
        """Hold ``events`` for the router that will claim them with the returned token.
        ``on_done`` runs once the stream is over (finished, broken, or never claimed). The
        stream's first event is requested now, so the engine starts before the claim."""
        token = secrets.token_hex(TOKEN_BYTES)
        self._parked[token] = _Parked(events, on_done)
        asyncio.get_running_loop().call_later(self._claim_timeout_s, self._expire, token)
        return token

    async def discard(self, token: str) -> None:
        """Close a stream that will not be claimed (its request was cancelled)."""
        parked = self._parked.pop(token, None)
        if parked is not None:
            await _close(parked)

    @property
    def parked(self) -> int:
        return len(self._parked)

    def _expire(self, token: str) -> None:
        parked = self._parked.pop(token, None)
        if parked is not None:
            logger.warning("stream %s... was never claimed; closing it", token[:8])
            asyncio.get_running_loop().create_task(_close(parked))

    @property
    def direct_active(self) -> int:
        return self._direct_active

    async def drain(self, timeout_s: float) -> bool:
        """Take no new direct requests; wait up to ``timeout_s`` for those running. True if none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._direct_idle.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parked = None
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=HANDSHAKE_TIMEOUT_S)
            if line.startswith(b"{"):
                await self._serve_requests(line, reader, writer)
                return
            parked = self._parked.pop(line.strip().decode("ascii", "replace"), None)
            if parked is None:
                return
            first = await parked.first
            if first is not None:
                await _write_events(parked.events, writer, first.encode())
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the router went away: closing the iterator aborts the request in vLLM
        finally:
            if parked is not None:
                await _close(parked)
            writer.close()

    async def _serve_requests(self, line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direct request per frame, in turn, until the router closes the connection or a
        stream ends without ``[DONE]`` (the close then tells the router the stream broke)."""
        while line:
            try:
                frame = json.loads(line)
                frame["endpoint"], frame["body"], frame["request_id"]
            except (ValueError, KeyError, TypeError):
                logger.warning("malformed direct request frame; closing the connection")
                return
            if self._secret is None or not hmac.compare_digest(str(frame.get("secret", "")), self._secret):
                logger.warning("direct request without the cluster's secret; closing the connection")
                return
            if self._handler is None or self.draining or frame.get("deployment") != self._deployment:
                writer.write(b'{"status":503,"retry":true}\n')
                await writer.drain()
                return
            self._direct_active += 1
            self._direct_idle.clear()
            try:
                opened = await self._handler(frame["endpoint"], frame["body"], frame["request_id"],
                                             frame.get("trace_headers"))
                if opened.events is None:
                    data = opened.body.encode()
                    writer.write(b"%s\n%s" % (json.dumps({"status": opened.status, "replica": opened.replica,
                                                           "length": len(data)}).encode(), data))
                elif not await self._pump(opened, writer):
                    return
            finally:
                self._direct_active -= 1
                if not self._direct_active:
                    self._direct_idle.set()
            await writer.drain()
            line = await reader.readline()

    @staticmethod
    async def _pump(opened, writer: asyncio.StreamWriter) -> bool:
        """Write a stream's events as they come; True when it ended with ``[DONE]``."""
        header = json.dumps({"status": opened.status, "replica": opened.replica}).encode() + b"\n"
        try:
            last = await _write_events(opened.events, writer, header)
        except ConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine failed mid-stream: the close tells the router
            logger.warning("direct stream failed: %r", exc)
            return False
        finally:
            await _aclose(opened.events)  # an early exit (router gone) aborts the request in vLLM
        return last.endswith(DONE_EVENT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for token in list(self._parked):
            await _close(self._parked.pop(token))


async def _write_events(events: AsyncIterator[str], writer: asyncio.StreamWriter, head: bytes) -> bytes:
    """Write ``head``, then each event as it comes; the last bytes written."""
    last = head
    writer.write(head)
    async for event in events:
        last = event.encode()
        writer.write(last)
        await writer.drain()  # returns at once unless the router is behind
    return last


async def _aclose(events: AsyncIterator[str]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _close(parked: _Parked) -> None:
    try:
        # The first step may still be running in its task: stop it before closing the iterator
        # (an async generator cannot be closed while it runs). Cancelling it aborts the request.
        if not parked.first.done():
            parked.first.cancel()
        await asyncio.wait([parked.first])
        if not parked.first.cancelled():
            parked.first.exception()  # retrieved: an engine error before the claim is not "never retrieved"
        await _aclose(parked.events)
    except Exception:  # noqa: BLE001 - best effort; the request is over either way
        pass
    finally:
        parked.on_done()


# ---- where routers find engine replicas (Ray's KV store) ---------------------------------------
# One key per replica, the address in the key itself: "<app>/<deployment>/<replica_id>/<host>:<port>".
# A replica writes its key again every REGISTER_EVERY_S with a new value (a heartbeat stamp), so
# - a router that removed a key it could not connect to never loses a live replica for long;
# - a key whose value stops changing belongs to a replica that died without removing it (a killed
#   process, a preempted cloud node): routers drop it after STALE_AFTER_S by their own clocks
#   (only changes are compared, never clocks across nodes), instead of trying its address.
REGISTER_EVERY_S = 10.0
STALE_AFTER_S = 3 * REGISTER_EVERY_S
SECRET_KEY = "secret"  # not under any app prefix, so never listed as a replica


def gate_prefix(app: str, deployment: str) -> str:
    return f"{app}/{deployment}/"


def gate_key(app: str, deployment: str, replica_id: str, host: str, port: int) -> str:
    return f"{gate_prefix(app, deployment)}{replica_id}/{host}:{port}"


def register_gate(app: str, deployment: str, replica_id: str, host: str, port: int) -> str:
    from ray.experimental.internal_kv import _internal_kv_put

    key = gate_key(app, deployment, replica_id, host, port)
    _internal_kv_put(key, str(time.time_ns()).encode(), namespace=KV_NAMESPACE)
    return key


def cluster_secret() -> str:
    """The secret that direct requests carry: made once per Ray cluster, kept in its KV store."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    _internal_kv_put(SECRET_KEY, secrets.token_hex(32), overwrite=False, namespace=KV_NAMESPACE)
    return _internal_kv_get(SECRET_KEY, namespace=KV_NAMESPACE).decode()


def unregister_gate_address(app: str, deployment: str, replica_id: str, host: str, port: int) -> None:
    unregister_gate(gate_key(app, deployment, replica_id, host, port))


def unregister_gate(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=KV_NAMESPACE)


def list_gates(app: str, deployment: str) -> list[tuple[str, str, int, bytes]]:
    """``(replica_id, host, port, heartbeat stamp)`` of each registered replica of a deployment
    (two GCS calls, whatever the number of replicas)."""
    from ray.experimental.internal_kv import _internal_kv_list, internal_kv_get_gcs_client

    prefix = gate_prefix(app, deployment)
    keys = _internal_kv_list(prefix, namespace=KV_NAMESPACE)
    if not keys:
        return []
    stamps = internal_kv_get_gcs_client().internal_kv_multi_get(keys, namespace=KV_NAMESPACE.encode())
    gates = []
    for key in keys:
        replica_id, _, address = key.decode()[len(prefix):].partition("/")
        host, _, port = address.rpartition(":")
        if replica_id and host and port.isdigit() and key in stamps:  # (gone between the two calls)
            gates.append((replica_id, host, int(port), stamps[key]))
    return gates
