"""How a request reaches an engine: one interface, several transports.

- ``direct`` (``transport/direct.py``): a frame over a pooled TCP connection to one engine replica's
  port; the default, no Ray call per request;
- ``serve_call`` (``transport/serve_call.py``): one Ray Serve streaming call, Serve picking the
  replica; the fallback for a replica the router does not know yet;
- an external OpenAI-compatible API will be a third.

Every transport answers an ``EngineReply`` (a complete body, or a stream whose first event has
not been read yet) or raises ``TransportError``: the target could not take or finish the request
and nothing reached the client, so the caller may try another replica. A reply with any status,
4xx and 5xx included, is the request's own answer and says nothing about the engine's health.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

EVENT_END = b"\n\n"
# One event larger than this means a broken or hostile site (a token's chunk is a few KB; the bound
# is the external site's default for a whole non-streamed answer, which an echoed prompt with its
# logprobs can approach): it is not buffered further.
MAX_EVENT_BYTES = 64 << 20


class EngineFull(Exception):
    """Every replica the request could go to answered that it is full (other routers filled it
    since this router's last load poll). Nothing started: queue the request again."""


class TransportError(Exception):
    """The target could not take or finish the request; nothing reached the client.
    ``replica``: the replica that failed, when known (it is then held out for a while)."""

    def __init__(self, message: str, replica: str | None = None):
        super().__init__(message)
        self.replica = replica


@dataclass
class EngineRequest:
    endpoint: str
    body: bytes
    request_id: str
    stream: bool
    trace_headers: dict[str, str] | None = None
    sequences: int = 1


@dataclass
class EngineStream:
    """The router's end of an engine's token stream. A direct stream has ``release``, which returns
    its connection to the pool when the stream ended cleanly (``[DONE]``) and closes it otherwise
    (which aborts the request in the engine); a claimed stream (Serve-call path) holds its ``call``,
    which keeps the request counted on its replica until the stream is over. ``head`` holds what
    ``read_first`` read ahead. Closing twice does nothing."""

    reader: Any  # asyncio.StreamReader, or anything with ``async read(n) -> bytes`` (b"" at the end)
    writer: asyncio.StreamWriter | None
    replica: str
    call: Any = None
    release: Callable[[bool], None] | None = None
    head: bytes = b""
    closed: bool = False

    async def read_first(self, read_bytes: int = 1 << 16) -> None:
        """Read until the first complete event: an engine that dies before its first token is then
        a ``TransportError`` (the caller may fail over), not a broken stream for the client."""
        if EVENT_END in self.head:
            return
        head = bytearray(self.head)  # (appended in place, searched from the join: linear in its size)
        start = 0
        while head.find(EVENT_END, start) < 0:
            if len(head) > MAX_EVENT_BYTES:
                raise TransportError(f"a first event of over {MAX_EVENT_BYTES} bytes", self.replica)
            start = max(0, len(head) - 1)
            try:
                chunk = await self.reader.read(read_bytes)
            except (ConnectionError, OSError) as exc:
                raise TransportError(f"stream broke before its first event: {exc!r}", self.replica) from exc
            if not chunk:
                raise TransportError("stream ended before its first event", self.replica)
            head += chunk
        self.head = bytes(head)

    def close(self, reusable: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.release is not None:
            self.release(reusable)
        elif self.writer is not None and not self.writer.is_closing():
            self.writer.close()
        if self.call is not None and not reusable:
            self.call.cancel()


@dataclass
class EngineReply:
    status: int
    replica: str
    body: bytes | None = None
    stream: EngineStream | None = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
