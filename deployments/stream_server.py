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
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator, Callable

logger = logging.getLogger("spillway.engine.stream")

TOKEN_BYTES = 16
CLAIM_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0


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
    def __init__(self, claim_timeout_s: float = CLAIM_TIMEOUT_S):
        self._claim_timeout_s = claim_timeout_s
        self._parked: dict[str, _Parked] = {}
        self._server: asyncio.base_events.Server | None = None
        self.host: str | None = None
        self.port: int | None = None

    async def start(self, host: str, bind: str = "0.0.0.0") -> None:
        self._server = await asyncio.start_server(self._serve, bind, 0)
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parked = None
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=HANDSHAKE_TIMEOUT_S)
            parked = self._parked.pop(line.strip().decode("ascii", "replace"), None)
            if parked is None:
                return
            first = await parked.first
            if first is None:
                return
            writer.write(first.encode())
            async for event in parked.events:
                writer.write(event.encode())
                await writer.drain()  # returns at once unless the router is behind
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass  # the router went away: closing the iterator aborts the request in vLLM
        finally:
            if parked is not None:
                await _close(parked)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for token in list(self._parked):
            await _close(self._parked.pop(token))


async def _close(parked: _Parked) -> None:
    try:
        # The first step may still be running in its task: stop it before closing the iterator
        # (an async generator cannot be closed while it runs). Cancelling it aborts the request.
        if not parked.first.done():
            parked.first.cancel()
        await asyncio.wait([parked.first])
        if not parked.first.cancelled():
            parked.first.exception()  # retrieved: an engine error before the claim is not "never retrieved"
        aclose = getattr(parked.events, "aclose", None)
        if aclose is not None:
            await aclose()
    except Exception:  # noqa: BLE001 - best effort; the request is over either way
        pass
    finally:
        parked.on_done()
