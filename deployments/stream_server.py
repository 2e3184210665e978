"""The engine replica's port: direct requests from routers, and token streams, off Ray's per-call path.

A router keeps pooled connections to each engine replica it knows (``deployments/discovery.py``)
and writes one frame per request (``deployments/wire.py``): no Ray call per request, and a
stream's SSE bytes go straight from the engine to the router. The Serve call (``EngineReplica.open``)
stays as the fallback: for a stream it parks the event iterator under a random token, and the
router claims it here with a ``C`` frame.

The port holds under hostile peers:
- it listens on the node's cluster address only, never on all interfaces (and, for routers on the
  same machine, on a Unix socket only its user may open: ``discovery.local_socket_path``);
- a frame's fixed header (secret, kind, length) is checked before its payload is read, so a peer
  without the secret, or one declaring a frame over ``max_frame_bytes``, costs 44 bytes;
- at most ``max_connections`` connections are served; more are closed at once;
- a connection idle for ``idle_timeout_s`` between frames is closed, and a payload must arrive
  within ``read_timeout_s`` of its header.

Lifecycle of a request:
- streamed: the header ``{"status", "replica"}`` as soon as vLLM returns the stream, then the SSE
  events as they come; the connection takes the next frame after ``data: [DONE]``. An engine that
  is dead before its first event closes the connection instead, so the router fails over;
- non-streamed: ``{"accepted": true}`` once vLLM has the request, then ``{"status", "replica",
  "length"}`` and the body. A router that closes the connection meanwhile aborts the request;
- a draining replica, or one that is not the deployment named, answers ``{"status": 503,
  "retry": true}``, and the router sends the request another way;
- a request that would take the engine past ``max_num_seqs`` sequences is answered ``{"full":
  true}`` at once: several routers share an engine, and between two load polls they may each
  admit into the same free sequences. The engine, the one place that knows, refuses the
  overflow, and the router queues the request again (or spills it): nothing waits in an engine
  that is full.

The engine starts a parked stream at once: parking pulls its first event in the background (vLLM
adds the request to its scheduler on the iterator's first step), so prefill runs while the reply
travels to the router. A parked stream not claimed within ``claim_timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from deployments import discovery, wire

logger = logging.getLogger("spillway.engine.port")

TOKEN_BYTES = 16
CLAIM_TIMEOUT_S = 30.0
MAX_STATS_WAIT_S = 5.0  # a router's load watch is answered within this, released or not
DONE_EVENT = b"data: [DONE]\n\n"
ERROR_EVENT_PREFIX = b'data: {"error"'

# (endpoint, body bytes, request_id, trace_headers, sequences to admit) -> Opened (deployments/engine.py)
RequestHandler = Callable[[str, bytes, str, "dict | None", "int | None"], Awaitable[Any]]


@dataclass(frozen=True)
class PortLimits:
    max_frame_bytes: int = 8 << 20
    max_connections: int = 1024
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 10.0


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
    def __init__(self, secret: bytes, limits: PortLimits = PortLimits(), deployment: str | None = None,
                 handler: RequestHandler | None = None, stats: Callable[[], dict] | None = None,
                 engine_dead: Callable[[], bool] = lambda: False, claim_timeout_s: float = CLAIM_TIMEOUT_S,
                 wait_release: Callable[[int, float], Awaitable[None]] | None = None):
        self._secret = secret
        self._limits = limits
        self._deployment = deployment
        self._handler = handler
        self._stats = stats
        self._engine_dead = engine_dead
        self._claim_timeout_s = claim_timeout_s
        self._wait_release = wait_release
        self._parked: dict[str, _Parked] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._direct_active = 0
        self._direct_idle = asyncio.Event()
        self._direct_idle.set()
        self.draining = False
        self.refused = {"connection_limit": 0, "bad_frame": 0, "idle": 0}
        self.host: str | None = None
        self.port: int | None = None
        self._unix_server: asyncio.base_events.Server | None = None
        self.local_socket: str | None = None

    async def start(self, host: str, local_socket: bool = False) -> None:
        """Listen on ``host`` (the node's cluster address) only; with ``local_socket`` also on a
        Unix socket (mode 0600, in a directory only this user may enter) for routers on this
        machine (``discovery.local_socket_path``). Without such a directory, TCP only."""
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        if local_socket and discovery.private_socket_dir() is not None:
            path = discovery.local_socket_path(host, self.port)
            try:
                # (a stale socket file from a replica that died on this port is replaced)
                self._unix_server = await asyncio.start_unix_server(self._serve, path)
                os.chmod(path, 0o600)
                self.local_socket = path
            except OSError as exc:
                logger.warning("no local socket for this replica (%s): %r; TCP only", path, exc)

    # ---- parked streams (the Serve-call fallback) ------------------------------------------

    def park(self, events: AsyncIterator[str], on_done: Callable[[], None] = lambda: None) -> str:
        """Hold ``events`` for the router that claims them with the returned token. ``on_done`` runs
        once the stream is over (finished, broken, or never claimed)."""
        token = secrets.token_hex(TOKEN_BYTES)
        self._parked[token] = _Parked(events, on_done)
        asyncio.get_running_loop().call_later(self._claim_timeout_s, self._expire, token)
        return token

    async def discard(self, token: str) -> None:
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

    # ---- connections ---------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def direct_active(self) -> int:
        return self._direct_active

    async def drain(self, timeout_s: float) -> bool:
        """Take no new requests; wait up to ``timeout_s`` for those running. True if none is left."""
        self.draining = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._direct_idle.wait()
        except asyncio.TimeoutError:
            return False
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self._limits.max_connections:
            self.refused["connection_limit"] += 1
            writer.close()
            return
        self._connections += 1
        self._writers.add(writer)
        try:
            while await self._serve_frame(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the router went away: whatever ran was aborted on the way out
        except asyncio.CancelledError:
            pass  # the server is closing: this handler task is the outermost frame
        finally:
            self._connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _serve_frame(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one frame; False when the connection must close."""
        try:
            async with asyncio.timeout(self._limits.idle_timeout_s):
                header = await reader.readexactly(wire.HEADER.size)
        except asyncio.TimeoutError:
            self.refused["idle"] += 1
            return False
        except asyncio.IncompleteReadError:
            return False  # closed between frames: the normal end of a pooled connection
        try:
            kind, length = wire.unpack(header, self._secret, self._limits.max_frame_bytes)
        except wire.WireError as exc:
            self.refused["bad_frame"] += 1
            logger.warning("refused a frame on the engine port: %s", exc)
            return False
        try:
            async with asyncio.timeout(self._limits.read_timeout_s):
                payload = await reader.readexactly(length)
        except asyncio.TimeoutError:
            self.refused["idle"] += 1
            return False
        if kind == wire.KIND_STATS:
            await self._wait_for_release(payload)
            stats = json.dumps(self._stats() if self._stats else {}).encode()
            writer.write(wire.header_line(length=len(stats)) + stats)
            await writer.drain()
            return True
        if kind == wire.KIND_CLAIM:
            await self._serve_claim(payload, writer)
            return False
        return await self._serve_request(payload, reader, writer)

    async def _wait_for_release(self, payload: bytes) -> None:
        """A stats frame may ask to wait: ``{"after": releases, "wait_ms": ms}`` is answered once
        sequences were released since ``after``, or after ``wait_ms`` (at most ``MAX_STATS_WAIT_S``).
        An empty or unreadable payload is answered at once."""
        if not payload or len(payload) > 256 or self._wait_release is None:
            return
        try:
            ask = json.loads(payload)
            after, wait_s = int(ask["after"]), float(ask["wait_ms"]) / 1000
        except (ValueError, TypeError, KeyError, OverflowError):
            return
        if wait_s == wait_s:  # not NaN
            await self._wait_release(after, min(max(wait_s, 0.0), MAX_STATS_WAIT_S))

    async def _serve_claim(self, payload: bytes, writer: asyncio.StreamWriter) -> None:
        parked = self._parked.pop(payload.decode("ascii", "replace"), None)
        if parked is None:
            return
        try:
            first = await parked.first
            if first is not None:
                await _write_events(parked.events, writer, first.encode())
        finally:
            await _close(parked)

    async def _serve_request(self, payload: bytes, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> bool:
        try:
            meta, body = wire.split_request(payload)
            endpoint, request_id = str(meta["endpoint"]), str(meta["request_id"])
            trace_headers = meta.get("trace_headers")
            sequences = meta.get("sequences")
            sequences = int(sequences) if sequences is not None else None
        except (ValueError, KeyError, TypeError):
            self.refused["bad_frame"] += 1
            logger.warning("malformed request frame; closing the connection")
            return False
        if self._handler is None or self.draining or meta.get("deployment") != self._deployment:
            writer.write(wire.RETRY_ELSEWHERE)
            await writer.drain()
            return False
        self._direct_active += 1
        self._direct_idle.clear()
        try:
            opened = await self._handler(endpoint, body, request_id, trace_headers, sequences)
            if getattr(opened, "full", False):
                writer.write(wire.header_line(status=503, replica=opened.replica, full=True, length=0))
                await writer.drain()
                return True
            if opened.pending is not None:
                return await self._finish_pending(opened, reader, writer)
            if opened.events is None:
                writer.write(wire.header_line(status=opened.status, replica=opened.replica,
                                              length=len(opened.body)) + opened.body)
                await writer.drain()
                return True
            return await self._pump(opened, reader, writer)
        finally:
            self._direct_active -= 1
            if not self._direct_active:
                self._direct_idle.set()

    async def _finish_pending(self, opened, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """A non-streamed request: accepted now, its result when generation ends. The router closing
        the connection meanwhile (its client went away) cancels the generation (vLLM aborts)."""
        writer.write(wire.ACCEPTED)
        await writer.drain()
        gone = asyncio.ensure_future(reader.read(1))  # the router sends nothing until the answer
        try:
            await asyncio.wait({opened.pending, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            opened.pending.cancel()
            gone.cancel()
            raise
        await _stop(gone)
        if not opened.pending.done():
            opened.pending.cancel()
            await asyncio.wait({opened.pending})
            return False
        status, body, engine_dead = opened.pending.result()
        if engine_dead:
            return False  # the router sees the connection close and fails over
        writer.write(wire.header_line(status=status, replica=opened.replica, length=len(body)) + body)
        await writer.drain()
        return True

    async def _pump(self, opened, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Write a stream's events as they come; True when it ended with ``[DONE]``. The wait for
        the first event (queueing and prefill: the long part) ends early if the router leaves."""
        writer.write(wire.header_line(status=opened.status, replica=opened.replica))
        try:
            first = await _first_unless_gone(opened.events, reader)
            if first is None or (first.encode().startswith(ERROR_EVENT_PREFIX) and self._engine_dead()):
                return False  # closed before its first event: the router may try another replica
            last = await _write_events(opened.events, writer, first.encode())
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
        if self._unix_server is not None:
            self._unix_server.close()
            self._unix_server = None
            try:
                os.unlink(self.local_socket)
            except OSError:
                pass
        for writer in list(self._writers):
            writer.close()
        for token in list(self._parked):
            await _close(self._parked.pop(token))


async def _stop(watcher: asyncio.Future) -> None:
    """Cancel a read watcher and wait until it has let go of the reader (the next frame reads it)."""
    watcher.cancel()
    await asyncio.wait({watcher})


async def _first_unless_gone(events: AsyncIterator[str], reader: asyncio.StreamReader) -> str | None:
    """The stream's first event; ``ConnectionError`` when the router closes the connection first
    (it sends nothing while a stream runs, so anything read means it is gone)."""
    first = asyncio.ensure_future(_next_event(events))
    gone = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _stop(gone)
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
    if first.cancelled():
        raise ConnectionError("the router left before the first event")
    return first.result()


async def _write_events(events: AsyncIterator[str], writer: asyncio.StreamWriter, head: bytes) -> bytes:
    """Write ``head``, then each event as it comes; the last bytes written."""
    last = head
    writer.write(head)
    await writer.drain()
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
