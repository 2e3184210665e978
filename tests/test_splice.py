"""A streamed answer spliced from the engine's socket to the client's (``pipeline/splice.py``),
without Ray: a FAKE engine behind the real StreamServer, the router's real Gate, relay and
SSEResponse, served by the router's real listener, and a client on a raw socket. Covers the bytes
the client gets (the same as the relay's), the engine connection going back to its pool, a client
that stops reading (the engine connection stops being read; nothing piles up in the router), a
client that leaves (the engine request is aborted), an engine that dies mid-stream, and both of
the loops the router may run on."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
import uvloop

from serve_app.http.edge import SSEResponse
from serve_app.http.listener import EdgeProtocol, SharedListener
from serve_app.pipeline.relay import relay
from serve_app.transport.direct import Gate
from tests.test_engine_port import DEPLOYMENT, DONE, SECRET, FakeEngine, FakeEngineEvents, request, serve, \
    stream_context, token_event
from tests.test_http_listener import free_port

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(coro, loop: str = "asyncio"):
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro)


class SpliceApp:
    """The router's streaming answer, reduced to its parts: one direct engine request per client
    request, relayed by ``SSEResponse`` as the gateway does."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.contexts = []
        self.edges = []

    async def __call__(self, scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        reply = await self.gate.request(DEPLOYMENT, request({"stream": True}, f"r{len(self.contexts)}"), 5)
        ctx = stream_context(reply)
        self.contexts.append(ctx)
        await reply.stream.read_first()

        def chunks(edge):
            self.edges.append(edge)
            return relay(ctx, edge)

        await SSEResponse(chunks, {})(scope, receive, send)


class Spliced:
    """Counts the chunks written past ASGI (the splice really ran)."""

    def __init__(self, monkeypatch):
        self.writes = 0
        original = EdgeProtocol.splice_write

        def counted(protocol, data):
            self.writes += 1
            original(protocol, data)

        monkeypatch.setattr(EdgeProtocol, "splice_write", counted)


@contextlib.asynccontextmanager
async def router(engine: FakeEngine):
    server = await serve(engine)
    gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
    app = SpliceApp(gate)
    port = free_port()
    listener = SharedListener(app, "127.0.0.1", port, head_timeout_s=5, max_connections=16, max_ongoing_requests=16,
                              grace_s=1)
    await listener.start()
    try:
        yield app, gate, port, listener
    finally:
        await listener.close()
        gate.close()
        await server.close()


async def post(reader, writer) -> tuple[int, bytes]:
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) != b"\r\n":
        pass
    return status, await read_chunked(reader)


async def read_chunked(reader, stop_after: int | None = None) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readline()).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return b"".join(chunks)
        chunks.append(data[:-2])
        if stop_after is not None and len(chunks) >= stop_after:
            return b"".join(chunks)


async def wait_for(condition, timeout_s=10.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_spliced_stream_is_the_relays_bytes_and_both_connections_serve_again(monkeypatch, loop):
    spliced = Spliced(monkeypatch)

    async def main():
        async with router(FakeEngine(tokens=40, delay_s=0.002)) as (app, gate, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            first = await post(reader, writer)
            pooled = [w for _, w, _ in gate.idle]
            second = await post(reader, writer)  # the same client connection, the same engine connection
            writer.close()
            return app, gate, first, second, pooled, [w for _, w, _ in gate.idle]

    app, gate, first, second, pooled, pooled_after = run(main(), loop)
    expected = ("".join(token_event(i) for i in range(40)) + DONE).encode()
    assert first == (200, expected) and second == (200, expected)  # usage dropped: the client did not ask
    assert all(edge is not None for edge in app.edges) and spliced.writes >= 40  # past ASGI, chunk by chunk
    assert len(pooled) == 1 and pooled_after == pooled and gate.in_flight == 0
    for ctx in app.contexts:
        assert ctx.summary.usage == (7, 3) and ctx.summary.events == 40 and ctx.outcome == "ok" and ctx.summary.spliced
        assert not ctx.summary.failed


class EndlessEvents(FakeEngineEvents):
    """8 KB events as fast as the engine's socket takes them, until aborted; counts them."""

    def __init__(self):
        super().__init__([])
        self.produced = 0

    async def _gen(self):
        self.started = True
        try:
            while True:
                self.produced += 1
                yield 'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % ("x" * 8000)
                await asyncio.sleep(0)
        finally:
            self.closed = True


class EndlessEngine(FakeEngine):
    async def __call__(self, endpoint, body, request_id, trace_headers, sequences=None):
        opened = await super().__call__(endpoint, body, request_id, trace_headers, sequences)
        opened.events = EndlessEvents()
        self.streams[-1] = opened.events
        return opened


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_stops_reading_stops_the_engine_and_one_that_leaves_aborts_it(monkeypatch, loop):
    spliced = Spliced(monkeypatch)
    engine = EndlessEngine()

    async def main():
        async with router(engine) as (app, gate, port, listener):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # (fills sooner)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            while (await reader.readline()) != b"\r\n":
                pass
            assert await wait_for(lambda: engine.streams)
            stream = engine.streams[0]
            # The client reads nothing: the engine's output stalls once the sockets are full.
            last, still = -1, 0
            while still < 30 and stream.produced < 20_000:
                await asyncio.sleep(0.01)
                still, last = (still + 1 if stream.produced == last else 0), stream.produced
            stalled_at = stream.produced
            buffered = max(p.transport.get_write_buffer_size() for p in listener._server.server_state.connections)
            # Reading resumes the flow.
            received = await read_chunked(reader, stop_after=stalled_at + 50)
            resumed = await wait_for(lambda: stream.produced > stalled_at + 50)
            writer.close()  # the client leaves mid-stream
            aborted = await wait_for(lambda: stream.closed)
            released = await wait_for(lambda: gate.in_flight == 0 and not gate.idle)
            return app, stalled_at, buffered, received, resumed, aborted, released

    app, stalled_at, buffered, received, resumed, aborted, released = run(main(), loop)
    assert stalled_at < 5_000  # (about 40 MB): stopped by flow control, not by the test's patience
    assert buffered < 1 << 20  # the router holds its socket's high-water mark and a chunk, no more
    assert received.count(b"\n\n") >= stalled_at + 50 and resumed
    assert aborted and released and spliced.writes > stalled_at
    assert app.contexts[0].outcome == "cancelled" and app.contexts[0].summary.failed


def test_an_engine_that_dies_mid_splice_ends_the_answer_with_an_error_event(monkeypatch):
    spliced = Spliced(monkeypatch)

    async def main():
        async with router(FakeEngine(tokens=20, delay_s=0.002, fail_after=10)) as (app, gate, port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await post(reader, writer)
            again = await post(reader, writer)  # the client's connection is still good
            writer.close()
            return app, gate, answer, again

    app, gate, (status, body), (status_again, _), = run(main())
    assert status == 200 and body.startswith(("".join(token_event(i) for i in range(10))).encode())
    assert body.endswith(b'"code": "bad_gateway"}}\n\n') and b"[DONE]" not in body and status_again == 200
    assert app.contexts[0].summary.failed and app.contexts[0].outcome == "stream_failed"
    assert spliced.writes >= 9 and gate.in_flight == 0


def test_a_response_that_is_not_the_connections_current_one_is_not_spliced():
    """A pipelined request replaces the connection's current cycle while the previous answer is
    still streaming: the previous one must then be relayed through ASGI, not spliced."""

    class Cycle:
        scope, response_started, response_complete, disconnected, chunked_encoding = {}, True, False, False, True

    class Transport:
        def is_closing(self):
            return False

    protocol = EdgeProtocol.__new__(EdgeProtocol)
    protocol.cycle, protocol.transport, protocol._splice_source, protocol._splice_held = Cycle(), Transport(), None, False
    assert not protocol.splice_begin({"another": "scope"}, Transport())
    Cycle.chunked_encoding = False
    assert not protocol.splice_begin(Cycle.scope, Transport())
