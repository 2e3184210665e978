"""Engine connections whose incoming bytes can be handed to a callback instead of a buffer.

A streamed answer's chunks normally reach the router's relay through ``StreamReader.read``: each
chunk wakes the request's task, which passes it down a chain of coroutines to the client's
socket. A ``SpliceReader`` can instead give every chunk, as the socket delivers it, to a ``sink``
(``pipeline/splice.py``), which forwards it at once from the protocol's callback: no task wakes
per chunk. Without a sink it is a plain ``StreamReader``; the connection then goes back to its
pool as any other.

The connections are opened as ``asyncio.open_connection`` opens them (whose docstring invites
exactly this copy to change the reader's class).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Sink(Protocol):
    def data(self, chunk: bytes) -> None: ...

    def ended(self, exc: BaseException | None) -> None: ...


class SpliceReader(asyncio.StreamReader):
    """A ``StreamReader`` whose data goes to ``sink`` while one is attached."""

    sink: Sink | None = None

    def attach(self, sink: Sink) -> None:
        """From now on chunks go to ``sink``, starting with what was buffered; the socket resumes
        if the full buffer had paused it. A stream that had already ended (or failed) calls
        ``sink.ended`` at once, after the buffered data."""
        buffered = bytes(self._buffer)
        self._buffer.clear()
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self.sink = sink
        if buffered:
            sink.data(buffered)
        if self.sink is sink and (self._exception is not None or self._eof):
            self.sink = None
            sink.ended(self._exception)

    def detach(self) -> None:
        self.sink = None

    def feed_data(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            super().feed_data(data)
        elif data:
            sink.data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.ended(None)

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.ended(exc)


async def open_stream(host: str, port: int) -> tuple[SpliceReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = SpliceReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def open_unix_stream(path: str) -> tuple[SpliceReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = SpliceReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_unix_connection(lambda: protocol, path)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
