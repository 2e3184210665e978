"""A router replica's own listener on the clients' port (``http.ingress: shared``).

Every router replica on a node binds ``http.host:http.port`` with ``SO_REUSEPORT`` and serves the
router's ASGI app itself, so the kernel spreads new connections over the replicas: no proxy
process and no second hop per token. A replica that dies takes its listener with it; new
connections go to the others at once.

Nothing stands in front to protect it, so the listener bounds what a client can hold:

- a connection must complete each request's head (request line and headers) within
  ``http.client_timeout_s`` of opening, or of its previous answer; otherwise it is closed (a
  408 if it had started one). Idle keep-alive connections end the same way;
- a request head over ``MAX_HEAD_BYTES`` is a 431, an unparsable one a 400, both in OpenAI's
  error format, and the connection is closed;
- at ``http.max_connections`` open connections, the one that has waited longest without sending a
  request is closed to make room for a new one; only when every connection has a request in
  progress does a new one get a 503;
- past ``router.max_ongoing_requests`` requests in flight a new one gets a 503 with Retry-After.

Every answer carries ``x-request-id``, as Serve's ingress gave it: the client's, or a new one.

A body that stalls half-way is the app's to time out (``router.body_timeout_s``, a 408). Closing
drains: the listening socket closes first (the other replicas take new connections), idle
connections close, and requests in flight get until the grace period ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import uuid

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve_app.errors import error_body
from serve_app.http.headers import valid_request_id

logger = logging.getLogger("spillway.http")

MAX_HEAD_BYTES = 64 << 10  # request line plus headers; OpenAI's clients send about 1 KB
LISTEN_BACKLOG = 2048
SPARE_FILES = 1024  # descriptors beyond the clients' connections: engine connections, logs, Ray's own
REFUSED_LINGER_S = 1.0  # a refused connection is read (and dropped) this long before it is closed
EDGE_KEY = "spillway.edge"  # in a request's scope: its connection's protocol (``StreamEdge``)


def _room_for_connections(max_connections: int) -> None:
    """Raise this process's open-file limit (soft, up to the hard one) so ``max_connections``
    client connections fit; say so where the hard limit is lower (the cap then never binds: accept
    fails first, and asyncio retries it, so new clients wait in the kernel's queue)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FILES
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning("open-file limit %d is below http.max_connections %d + %d: raise the hard limit "
                       "(ulimit -Hn) on this node", target, max_connections, SPARE_FILES)


def error_answer(status: int, message: str, code: str, *, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 answer with an OpenAI-format error body; the connection closes after it."""
    body = json.dumps(error_body(message, "invalid_request_error" if status < 500 else "server_error", status,
                                 code=code)).encode()
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class _HeadTooLarge(Exception):
    pass


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds above. A listener makes a subclass that
    carries its limits and the connections waiting for a head (uvicorn builds protocols from the
    class alone)."""

    head_timeout_s: float = 30.0
    max_connections: int = 4096
    waiting: dict  # {protocol: None}, oldest first: connections with no request in progress

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._splice_source: asyncio.Transport | None = None
        self._splice_held = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        if len(self.connections) >= self.max_connections and not self._evict_oldest_waiting():
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def _evict_oldest_waiting(self) -> bool:
        """At the cap, the connection that has waited longest without sending a request makes
        room: a flood of silent connections cannot lock out clients that send theirs at once."""
        for victim in self.waiting:
            victim._head_timed_out()
            return True
        return False

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Every connection has a request in progress: a 503, then our side closes. Reading goes
        on until the client closes (or a second passes), so its request bytes are read, not
        answered with a reset that could overtake the 503."""
        self._refused = True
        self.transport = transport  # (connection_lost closes it)
        transport.write(error_answer(503, "this router holds http.max_connections connections; retry",
                                     "too_many_connections", retry_after_s=1))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._refused:
            return  # (never counted, never parsed)
        super().connection_lost(exc)

    # A request's head must arrive in time and within bounds.
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)
        self.waiting[self] = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self._head_bytes:  # it began a request and never finished its head
            self.transport.write(error_answer(408, "the request head did not arrive in time", "request_timeout"))
        self.transport.close()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_message_begin(self) -> None:
        self._head_bytes = 1
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        scope = self.scope
        super().on_headers_complete()
        scope[EDGE_KEY] = self  # (a streamed answer may be spliced into this connection: ``StreamEdge``)

    # A streamed answer spliced from an engine connection (``pipeline/splice.py``).
    def splice_begin(self, scope: dict, source: asyncio.Transport) -> bool:
        """Take chunks of ``scope``'s answer past ASGI: only while it is this connection's
        current response, started with chunked framing and not finished. While the client's
        socket is backed up, ``source`` (the engine connection) is not read."""
        cycle = self.cycle
        if cycle is None or cycle.scope is not scope or not cycle.response_started or cycle.response_complete \
                or cycle.disconnected or not cycle.chunked_encoding or self.transport.is_closing():
            return False
        self._splice_source = source
        if self.flow.write_paused:
            self._splice_hold(True)
        return True

    def splice_write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def splice_end(self) -> None:
        self._splice_hold(False)
        self._splice_source = None

    def _splice_hold(self, hold: bool) -> None:
        source = self._splice_source
        if source is None or hold == self._splice_held:
            return
        self._splice_held = hold
        if not source.is_closing():
            source.pause_reading() if hold else source.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._splice_hold(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._splice_hold(False)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # (starts a pipelined request, if one is queued)
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.pipeline and not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head (or the connection ends)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # (read and dropped: the 503 is on its way)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no upgrades (WebSocket) here: the request is served as plain HTTP
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._reject(error_answer(431, f"request head over {MAX_HEAD_BYTES} bytes", "header_too_large"))
            else:
                self._reject(error_answer(400, "malformed HTTP request", "invalid_http"))

    def _reject(self, answer: bytes) -> None:
        self._cancel_head_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A body that turned malformed mid-request: the app sees the client gone (what it
            # would still send is dropped), and the client gets the error if no answer began.
            answered = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if not answered:
                self.transport.write(answer)
        else:
            self.transport.write(answer)
        self.transport.close()


class StreamEdge:
    """One streamed answer's way to its client's socket past ASGI (``pipeline/splice.ClientEdge``)."""

    __slots__ = ("protocol", "scope")

    def __init__(self, protocol: EdgeProtocol, scope: dict):
        self.protocol, self.scope = protocol, scope

    @classmethod
    def of(cls, scope: dict) -> StreamEdge | None:
        """The edge of a request this listener serves; None under any other server."""
        protocol = scope.get(EDGE_KEY)
        return cls(protocol, scope) if isinstance(protocol, EdgeProtocol) else None

    def begin(self, source: asyncio.Transport) -> bool:
        return self.protocol.splice_begin(self.scope, source)

    def write(self, data: bytes) -> None:
        self.protocol.splice_write(data)

    def end(self) -> None:
        self.protocol.splice_end()


class ListenerApp:
    """ASGI wrapper for what Serve's ingress did around the router's app: past ``limit`` requests
    in flight on this replica a 503 with Retry-After; every answer carries ``x-request-id`` (the
    client's when it is valid, else a new one, which the request then carries too)."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.ongoing = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        if not request_id:
            request_id = uuid.uuid4().hex.encode()
            scope["headers"].append((b"x-request-id", request_id))
        elif not valid_request_id(request_id.decode("latin-1")):
            request_id = uuid.uuid4().hex.encode()  # (the request keeps the client's, which the edge refuses)
        if self.ongoing >= self.limit:
            body = json.dumps(error_body("this router replica holds router.max_ongoing_requests requests; retry",
                                         "server_error", 503, code="overloaded")).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"), (b"x-request-id", request_id)]})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        self.ongoing += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.ongoing -= 1


class SharedListener:
    """Serves ``app`` on ``host:port`` beside every other replica that binds it the same way."""

    def __init__(self, app, host: str, port: int, *, head_timeout_s: float, max_connections: int,
                 max_ongoing_requests: int, grace_s: float):
        protocol = type("BoundEdgeProtocol", (EdgeProtocol,),
                        {"head_timeout_s": head_timeout_s, "max_connections": max_connections, "waiting": {}})
        self.app = ListenerApp(app, max_ongoing_requests)
        self._max_connections = max_connections
        self.address = (host, port)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, http=protocol, ws="none", lifespan="off", interface="asgi3", loop="none",
            proxy_headers=False, server_header=False, access_log=False, log_config=None,
            timeout_keep_alive=max(1, int(head_timeout_s)), timeout_graceful_shutdown=grace_s,
            backlog=LISTEN_BACKLOG))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Bind now (a port held by something else fails here, at start-up) and serve."""
        _room_for_connections(self._max_connections)
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot listen on {self.address[0]}:{self.address[1]} beside the other "
                               f"router replicas (SO_REUSEPORT): {exc}") from exc
        sock.setblocking(False)
        server = self._server
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        await self._server.main_loop()
        await self._server.shutdown(sockets=[sock])

    @property
    def serving(self) -> bool:
        """Started and not yet stopped (it may be draining)."""
        return self._task is not None and not self._task.done()

    @property
    def accepting(self) -> bool:
        """Its listening socket takes new connections (false once a drain has begun)."""
        return self.serving and any(server.is_serving() for server in self._server.servers)

    async def close(self) -> None:
        """Stop taking connections, close idle ones, let requests in flight finish within the grace."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), self._server.config.timeout_graceful_shutdown + 1)
        if not self._task.done():
            self._task.cancel()
