"""A streamed answer spliced from the engine's socket to the client's.

When the router's own listener serves the client (``http.ingress: shared``) and the stream comes
over a direct engine connection, the relay hands the engine connection's reader a sink
(``transport/streams.py``): each chunk the socket delivers is cut into events, counted and
written to the client's socket from the protocol callback, with HTTP's chunked framing. No task
wakes and no coroutine chain runs per chunk; the request's task sleeps until the stream ends,
and then sends the last chunk (the one with ``[DONE]``) through ASGI, which ends the response
as any other. The bookkeeping is the relay's own (``relay.EventCutter``), so the client sees the
same bytes either way.

Flow control: while the client's socket is backed up (its transport paused our writes), the
engine connection stops being read, so the engine's socket fills and its writer waits, as with a
relay that stops reading. A client that goes away cancels the request's task as before; the
splice ends with it and the engine connection is closed (which aborts the request there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from serve_app.transport.base import EngineStream
from serve_app.transport.streams import SpliceReader

logger = logging.getLogger("spillway.relay")


class ClientEdge(Protocol):
    """The client's connection, past ASGI (``http/listener.py``)."""

    def begin(self, source: asyncio.Transport) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...


def spliceable(stream: EngineStream) -> bool:
    return isinstance(stream.reader, SpliceReader) and stream.writer is not None and not stream.closed


class _Sink:
    def __init__(self, cutter, edge: ClientEdge, reader: SpliceReader, request_id: str):
        self.cutter, self.edge, self.reader, self.request_id = cutter, edge, reader, request_id
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()

    def data(self, chunk: bytes) -> None:
        if self.result.done():
            return
        try:
            complete = self.cutter.feed(chunk, time.monotonic())
            if not self.cutter.stopped:
                if complete:
                    self.edge.write(complete)
                return
        except Exception as exc:  # noqa: BLE001 - raised in the request's task, not the loop's callback
            self.reader.detach()
            self.result.set_exception(exc)
            return
        self.reader.detach()  # what follows [DONE] stays in the reader (the connection is then not reused)
        self.result.set_result(complete)

    def ended(self, exc: BaseException | None) -> None:
        if exc is not None:
            logger.warning("request %s: engine stream broke: %r", self.request_id, exc)
        if not self.result.done():
            self.result.set_result(b"")


async def splice(stream: EngineStream, cutter, edge: ClientEdge, request_id: str) -> bytes | None:
    """Relay ``stream`` to ``edge`` until ``cutter`` stops or the engine's side ends. Answers the
    chunk that ends the answer (``b""`` when the stream ended without one), or None when the
    client's connection could not take a splice (the caller reads the stream as usual)."""
    reader: SpliceReader = stream.reader
    if not edge.begin(stream.writer.transport):
        return None
    sink = _Sink(cutter, edge, reader, request_id)
    try:
        reader.attach(sink)
        return await sink.result
    finally:
        reader.detach()
        edge.end()
