"""The engine's port and the router's direct transport, without Ray: a FAKE engine (an async
handler returning a body, an SSE event iterator or a pending result) behind the real
StreamServer, called by the router's real Gate and relayed by the real relay over localhost.
Covers the handshake (bad secret, huge declared frame, silent and surplus connections), pooled
reuse, acceptance versus generation time, abandoned requests, dead engines, and the relay."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass

import pytest

from deployments import discovery, wire
from deployments.stream_server import PortLimits, StreamServer
from serve_app.observe.tracing import NO_TRACE
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.relay import relay
from serve_app.pipeline.scan import ScanSpec, scan_request
from serve_app.transport.base import EngineReply, EngineRequest, EngineStream, TransportError
from serve_app.transport.direct import Gate, GateDirectory, GateUnavailable

DEPLOYMENT = "engine-fake-onprem"
DONE = "data: [DONE]\n\n"
SECRET = bytes(range(32))
USAGE = 'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
ERROR_EVENT = 'data: {"error":{"message":"engine dead","type":"internal_error","code":500}}\n\n'


def token_event(i: int) -> str:
    return 'data: {"id":"x","choices":[{"index":0,"delta":{"content":"t%d\\u2028"}}]}\n\n' % i


class FakeEngineEvents:
    """Stands in for vLLM's SSE iterator; records whether it was closed (vLLM would abort)."""

    def __init__(self, events, delay_s=0.0, fail_after=None):
        self.events, self.delay_s, self.fail_after = list(events), delay_s, fail_after
        self.closed = self.started = False
        self._iter = self._gen()

    async def _gen(self):
        self.started = True  # vLLM adds the request to its scheduler here
        try:
            for i, event in enumerate(self.events):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("engine died")
                await asyncio.sleep(self.delay_s)
                yield event
        finally:
            self.closed = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._iter.__anext__()

    async def aclose(self):
        self.closed = True  # also when never started (an unstarted generator skips its finally)
        await self._iter.aclose()


@dataclass
class FakeOpened:
    status: int
    replica: str
    body: bytes | None = None
    events: object = None
    pending: object = None
    full: bool = False


class FakeEngine:
    """A FAKE engine: a stream for stream=true, else a pending result after ``generate_s``."""

    def __init__(self, delay_s=0.0, fail_after=None, tokens=3, generate_s=0.0, accept_s=0.0, first=None,
                 replica="r-1", max_sequences=None):
        self.calls: list[tuple[str, dict, str]] = []
        self.streams: list[FakeEngineEvents] = []
        self.pending: list[asyncio.Future] = []
        self.delay_s, self.fail_after, self.tokens = delay_s, fail_after, tokens
        self.generate_s, self.accept_s, self.first, self.replica = generate_s, accept_s, first, replica
        self.max_sequences, self.refused = max_sequences, 0

    async def __call__(self, endpoint, body: bytes, request_id, trace_headers, sequences=None):
        fields = json.loads(body)
        self.calls.append((endpoint, fields, request_id))
        await asyncio.sleep(self.accept_s)
        if sequences is not None and self.max_sequences is not None and self.running() + sequences > self.max_sequences:
            self.refused += 1
            return FakeOpened(503, self.replica, full=True)
        if fields.get("invalid"):
            return FakeOpened(400, self.replica, body=b'{"error":{"message":"bad","type":"invalid_request_error"}}')
        if not fields.get("stream"):
            pending = asyncio.ensure_future(self._generate(fields, request_id))
            self.pending.append(pending)
            return FakeOpened(200, self.replica, pending=pending)
        events = (self.first or []) + [token_event(i) for i in range(self.tokens)] + [USAGE, DONE]
        stream = FakeEngineEvents(events, delay_s=self.delay_s, fail_after=self.fail_after)
        self.streams.append(stream)
        return FakeOpened(200, self.replica, events=stream)

    def running(self) -> int:
        return sum(not s.closed for s in self.streams) + sum(not p.done() for p in self.pending)

    async def _generate(self, fields, request_id):
        await asyncio.sleep(self.generate_s)
        answer = {"id": request_id, "echo": fields.get("messages"), "text": "réponse ✓",
                  "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
        return 200, json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode(), False


async def serve(engine, deployment=DEPLOYMENT, limits=PortLimits(), engine_dead=lambda: False) -> StreamServer:
    server = StreamServer(SECRET, limits, deployment=deployment, handler=engine, stats=lambda: {"sequences": 2},
                          engine_dead=engine_dead)
    await server.start("127.0.0.1")
    return server


def request(body: dict, request_id="a") -> EngineRequest:
    return EngineRequest("chat", json.dumps(body).encode(), request_id, bool(body.get("stream")))


def stream_context(reply: EngineReply, strip_usage=True) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    if not strip_usage:
        body["stream_options"] = {"include_usage": True}
    ctx = RequestContext("chat", RequestHeaders("rid"), NO_TRACE)
    ctx.scan = scan_request(json.dumps(body).encode(), "chat", ScanSpec())
    ctx.reply = reply
    return ctx


async def relay_all(reply: EngineReply, strip_usage=True):
    ctx = stream_context(reply, strip_usage)
    await reply.stream.read_first()
    return b"".join([chunk async for chunk in relay(ctx)]), ctx


def run(coro):
    return asyncio.run(coro)


# ---- handshake and limits -------------------------------------------------------------------------


async def raw_exchange(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


def test_a_frame_without_the_secret_is_refused_before_its_body_is_read():
    async def main():
        engine = FakeEngine()
        server = await serve(engine)
        payload = wire.request_payload({"deployment": DEPLOYMENT, "endpoint": "chat", "request_id": "a"}, b"{}")
        answer = await raw_exchange(server.port, wire.pack(wire.KIND_REQUEST, bytes(32), payload))
        outsider = Gate("r-1", "127.0.0.1", server.port, bytes(32))
        with pytest.raises(TransportError):
            await outsider.request(DEPLOYMENT, request({"messages": ["hi"]}), 5)
        await server.close()
        return engine, answer, server.refused

    engine, answer, refused = run(main())
    assert answer == b"" and engine.calls == [] and refused["bad_frame"] == 2


def test_a_huge_declared_frame_is_refused_from_its_header_alone():
    async def main():
        server = await serve(FakeEngine(), limits=PortLimits(max_frame_bytes=1024))
        header = wire.HEADER.pack(wire.MAGIC, wire.KIND_REQUEST, 1 << 30, SECRET)  # declares 1 GiB, sends none
        answer = await raw_exchange(server.port, header)
        garbage = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
        await server.close()
        return answer, garbage, server.refused

    answer, garbage, refused = run(main())
    assert answer == b"" and garbage == b"" and refused["bad_frame"] == 2


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout():
    async def main():
        server = await serve(FakeEngine(), limits=PortLimits(idle_timeout_s=0.2, read_timeout_s=0.2))
        loop = asyncio.get_running_loop()
        started = loop.time()
        silent = await raw_exchange(server.port, b"")
        silent_s = loop.time() - started
        # A header, then a payload that never comes: closed after read_timeout_s.
        started = loop.time()
        stalled = await raw_exchange(server.port, wire.HEADER.pack(wire.MAGIC, wire.KIND_REQUEST, 100, SECRET))
        stalled_s = loop.time() - started
        await server.close()
        return silent, silent_s, stalled, stalled_s, server.refused, server.connections

    silent, silent_s, stalled, stalled_s, refused, connections = run(main())
    assert silent == b"" and 0.15 < silent_s < 2 and stalled == b"" and 0.15 < stalled_s < 2
    assert refused["idle"] == 2 and connections == 0


def test_connections_past_the_cap_are_closed_at_once():
    async def main():
        server = await serve(FakeEngine(), limits=PortLimits(max_connections=2, idle_timeout_s=5))
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.05)
        extra = await raw_exchange(server.port, b"", wait_s=2)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        with pytest.raises(TransportError):  # a replica that refuses service is a failed one
            await gate.request(DEPLOYMENT, request({"messages": []}), 2)
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.05)
        status_after = (await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 2)).status
        await server.close()
        return extra, server.refused, status_after

    extra, refused, status_after = run(main())
    assert extra == b"" and refused["connection_limit"] >= 2 and status_after == 200


def test_the_secret_comparison_never_raises():
    for presented in (b"", b"\xff" * 32, "é".encode() * 16):
        header = wire.HEADER.pack(wire.MAGIC, wire.KIND_REQUEST, 1, presented.ljust(32, b"\0")[:32])
        with pytest.raises(wire.WireError):
            wire.unpack(header, SECRET, 100)


# ---- requests ---------------------------------------------------------------------------------------


def test_bodies_streams_and_load_reports_share_one_pooled_connection():
    async def main():
        engine = FakeEngine()
        server = await serve(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        first = await gate.request(DEPLOYMENT, request({"messages": ["hi"]}), 5)
        connection = gate.idle[-1][1]
        streamed = await gate.request(DEPLOYMENT, request({"stream": True}, "b"), 5)
        assert gate.idle == [] and gate.in_flight == 1  # the stream holds the connection
        received, ctx = await relay_all(streamed)
        stats = await gate.stats(5)
        third = await gate.request(DEPLOYMENT, request({"messages": ["again"]}, "c"), 5)
        pooled = [w for _, w, _ in gate.idle]
        await server.close()
        return first, received, ctx, stats, third, connection, pooled, gate, engine

    first, received, ctx, stats, third, connection, pooled, gate, engine = run(main())
    assert (first.status, first.replica, json.loads(first.body)["echo"]) == (200, "r-1", ["hi"])
    assert received == ("".join(token_event(i) for i in range(3)) + DONE).encode()
    assert ctx.summary.usage == (7, 3) and not ctx.summary.failed and ctx.outcome == "ok"
    assert stats == {"sequences": 2}
    assert pooled == [connection]  # the same connection served all four
    assert json.loads(third.body)["id"] == "c" and gate.in_flight == 0
    assert [c[2] for c in engine.calls] == ["a", "b", "c"] and engine.streams[0].closed


def test_the_accept_timeout_covers_acceptance_not_generation():
    async def main():
        server = await serve(FakeEngine(generate_s=0.5))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        slow_answer = await gate.request(DEPLOYMENT, request({"messages": ["x"]}), timeout_s=0.2)
        await server.close()
        server = await serve(FakeEngine(accept_s=1.0))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        with pytest.raises(TransportError) as info:
            await gate.request(DEPLOYMENT, request({"messages": ["x"]}), timeout_s=0.2)
        await server.close()
        return slow_answer, info.value, gate

    slow_answer, error, gate = run(main())
    assert slow_answer.status == 200  # generation took 0.5 s, past the 0.2 s accept timeout: fine
    assert error.replica == "r-1" and "no answer" in str(error) and gate.in_flight == 0


def test_an_abandoned_non_streamed_request_is_aborted_on_the_engine():
    async def main():
        engine = FakeEngine(generate_s=30)
        server = await serve(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        task = asyncio.create_task(gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5))
        for _ in range(100):
            if engine.pending:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away: the router closes the connection
        for _ in range(100):
            if engine.pending[0].done():
                break
            await asyncio.sleep(0.01)
        await server.close()
        return engine, gate

    engine, gate = run(main())
    assert engine.pending[0].cancelled() and gate.in_flight == 0 and gate.idle == []


def test_engine_answers_of_any_status_are_replies_not_transport_failures():
    async def main():
        server = await serve(FakeEngine())
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        reply = await gate.request(DEPLOYMENT, request({"invalid": True}), 5)
        again = await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5)
        await server.close()
        return reply, again, gate

    reply, again, gate = run(main())
    assert reply.status == 400 and again.status == 200 and len(gate.idle) == 1


def test_a_dead_engine_before_the_first_event_is_a_transport_failure():
    async def main():
        dead = [False]
        engine = FakeEngine(first=[ERROR_EVENT])
        server = await serve(engine, engine_dead=lambda: dead[0])
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        alive = await gate.request(DEPLOYMENT, request({"stream": True}), 5)
        received, _ = await relay_all(alive)  # an error event from a live engine is the request's own
        dead[0] = True
        reply = await gate.request(DEPLOYMENT, request({"stream": True}), 5)
        with pytest.raises(TransportError):
            await reply.stream.read_first()
        reply.close()
        await server.close()
        return received, gate

    received, gate = run(main())
    assert received.startswith(ERROR_EVENT.encode()) and gate.in_flight == 0


def test_a_draining_replica_sends_the_request_elsewhere_and_is_skipped():
    async def main():
        engine = FakeEngine()
        server = await serve(engine)
        assert await server.drain(1.0)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        with pytest.raises(GateUnavailable, match="draining") as info:
            await gate.request(DEPLOYMENT, request({"messages": []}), 5)
        other = await serve(FakeEngine(), deployment="engine-other")
        with pytest.raises(GateUnavailable):
            await Gate("r-2", "127.0.0.1", other.port, SECRET).request(DEPLOYMENT, request({"messages": []}), 5)
        await server.close()
        await other.close()
        return engine, gate, info.value

    engine, gate, error = run(main())
    assert engine.calls == [] and gate.in_flight == 0 and not error.gone and not gate.available(gate.clock())


def test_a_refused_connection_is_unavailable_and_forgotten():
    async def main():
        server = await serve(FakeEngine())
        port = server.port
        await server.close()
        directory = GateDirectory(lister=lambda app, dep: [("r-1", "127.0.0.1", port, b"1")],
                                  secret=lambda: SECRET.hex())
        directory.watch("app", DEPLOYMENT)
        directory.apply(directory.fetch())
        gate = directory.pick("app", DEPLOYMENT)
        with pytest.raises(GateUnavailable) as info:
            await gate.request(DEPLOYMENT, request({"messages": []}), 5)
        entries = directory.forget("app", DEPLOYMENT, gate)
        return gate, info.value, entries, directory

    gate, error, entries, directory = run(main())
    assert error.gone and gate.in_flight == 0
    assert entries == [("app", DEPLOYMENT, "r-1", "127.0.0.1", gate.port)]
    assert directory.report()["replicas"] == {DEPLOYMENT: []}


def test_a_stale_pooled_connection_is_replaced_transparently():
    async def main():
        server = await serve(FakeEngine())

        async def close_at_once(reader, writer):
            writer.close()

        dead_end = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", dead_end.sockets[0].getsockname()[1])
        await asyncio.sleep(0.05)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        gate.idle.append((reader, writer, gate.clock()))
        reply = await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5)
        dead_end.close()
        await server.close()
        return reply

    reply = run(main())
    assert reply.status == 200 and json.loads(reply.body)["id"] == "a"


def test_connections_idle_near_the_engines_timeout_are_not_reused():
    async def main():
        server = await serve(FakeEngine())
        now = [0.0]
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET, idle_timeout_s=60, clock=lambda: now[0])
        await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5)
        old = gate.idle[-1][1]
        now[0] += 31  # past half the engine's idle timeout: it may close any moment
        await gate.request(DEPLOYMENT, request({"messages": ["y"]}), 5)
        await server.close()
        return old, gate

    old, gate = run(main())
    assert old.is_closing() and gate.idle[-1][1] is not old


def test_a_long_conversation_goes_direct_too():
    async def main():
        server = await serve(FakeEngine())
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        history = [{"role": "user", "content": "x" * 1000}] * 2000  # ~2 MB, far past asyncio's line limit
        reply = await gate.request(DEPLOYMENT, request({"messages": history}), 5)
        await server.close()
        return reply

    reply = run(main())
    assert reply.status == 200 and len(json.loads(reply.body)["echo"]) == 2000


# ---- relay ------------------------------------------------------------------------------------------


def test_usage_is_stripped_when_the_client_did_not_ask_and_kept_when_it_did():
    async def main():
        server = await serve(FakeEngine(tokens=1))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        stripped, ctx = await relay_all(await gate.request(DEPLOYMENT, request({"stream": True}), 5))
        kept, _ = await relay_all(await gate.request(DEPLOYMENT, request({"stream": True}), 5), strip_usage=False)
        await server.close()
        return stripped, kept, ctx

    stripped, kept, ctx = run(main())
    assert stripped == (token_event(0) + DONE).encode() and ctx.summary.usage == (7, 3)
    assert kept == (token_event(0) + USAGE + DONE).encode()


def test_engine_failure_mid_stream_ends_with_an_error_event_and_no_reuse():
    async def main():
        server = await serve(FakeEngine(fail_after=2, tokens=5))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        received, ctx = await relay_all(await gate.request(DEPLOYMENT, request({"stream": True}), 5))
        await server.close()
        return received, ctx, gate

    received, ctx, gate = run(main())
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[:2] == [token_event(0).strip(), token_event(1).strip()]
    assert json.loads(events[-1][6:])["error"]["type"] == "engine_error"
    assert ctx.summary.failed and ctx.outcome == "stream_failed" and gate.idle == [] and gate.in_flight == 0


def test_client_gone_mid_stream_aborts_the_engine_and_drops_the_connection():
    async def main():
        engine = FakeEngine(delay_s=0.01, tokens=500)
        server = await serve(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        reply = await gate.request(DEPLOYMENT, request({"stream": True}), 5)
        await reply.stream.read_first()
        ctx = stream_context(reply)
        iterator = relay(ctx).__aiter__()
        await iterator.__anext__()
        await iterator.aclose()  # what Starlette does when the client goes away
        for _ in range(100):
            if engine.streams[0].closed:
                break
            await asyncio.sleep(0.02)
        drained = await server.drain(2.0)
        await server.close()
        return engine, gate, ctx, drained

    engine, gate, ctx, drained = run(main())
    assert engine.streams[0].closed and ctx.outcome == "cancelled"
    assert gate.idle == [] and gate.in_flight == 0 and drained


def test_events_split_across_reads_are_forwarded_whole():
    async def main():
        whole = token_event(0) + USAGE + DONE
        engine = FakeEngine(tokens=0)
        engine.first = [whole[:10], whole[10:70], whole[70:]]  # cut mid-event
        server = await serve(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        reply = await gate.request(DEPLOYMENT, request({"stream": True}), 5)
        await reply.stream.read_first()
        ctx = stream_context(reply)
        chunks = [chunk async for chunk in relay(ctx)]
        await server.close()
        return chunks, ctx

    chunks, ctx = run(main())
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    assert b"".join(chunks).startswith((token_event(0) + DONE).encode())


def test_drain_waits_for_running_direct_streams():
    async def main():
        server = await serve(FakeEngine(delay_s=0.05, tokens=6))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        reply = await gate.request(DEPLOYMENT, request({"stream": True}), 5)
        streaming = asyncio.ensure_future(relay_all(reply))
        await asyncio.sleep(0.05)
        not_yet = await server.drain(0.01)
        done = await server.drain(5.0)
        received, ctx = await streaming
        await server.close()
        return not_yet, done, received, ctx

    not_yet, done, received, ctx = run(main())
    assert not not_yet and done and received.endswith(DONE.encode()) and not ctx.summary.failed


# ---- parked streams (the Serve-call fallback) ------------------------------------------------------


async def claim(server: StreamServer, token: str, secret=SECRET) -> EngineStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(wire.pack(wire.KIND_CLAIM, secret, token.encode()))
    return EngineStream(reader, writer, "r-1")


def test_the_engine_starts_before_the_router_claims_the_stream():
    async def main():
        server = await serve(FakeEngine())
        events = FakeEngineEvents([token_event(0), DONE])
        token = server.park(events)
        await asyncio.sleep(0.05)
        started_before_claim = events.started
        received, ctx = await relay_all(EngineReply(200, "r-1", stream=await claim(server, token)))
        await server.close()
        return started_before_claim, received, ctx

    started_before_claim, received, ctx = run(main())
    assert started_before_claim and received == (token_event(0) + DONE).encode() and not ctx.summary.failed


def test_unclaimed_streams_expire_and_a_wrong_token_or_secret_gets_nothing():
    async def main():
        server = StreamServer(SECRET, claim_timeout_s=0.2)
        await server.start("127.0.0.1")
        events, done = FakeEngineEvents([token_event(0)], delay_s=30), asyncio.Event()
        token = server.park(events, done.set)
        wrong_token = await claim(server, "not-the-token")
        wrong_secret = await claim(server, token, secret=bytes(32))
        nothing = [await asyncio.wait_for(s.reader.read(), 5) for s in (wrong_token, wrong_secret)]
        await asyncio.wait_for(done.wait(), 5)
        parked = server.parked
        await server.close()
        return nothing, parked, events

    nothing, parked, events = run(main())
    assert nothing == [b"", b""] and parked == 0 and events.closed  # the 30 s first token was not waited for


@pytest.fixture
def sockets(monkeypatch):
    """A socket directory of the test's own (mode 0700; short: a socket path has at most 107 bytes)."""
    path = tempfile.mkdtemp(prefix="spw")
    monkeypatch.setattr(discovery, "socket_dir", lambda: path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_replica_on_this_machine_is_reached_over_its_private_unix_socket(monkeypatch, sockets):
    monkeypatch.setattr(discovery, "_node_ip", lambda: "127.0.0.1")

    async def main():
        server = StreamServer(SECRET, PortLimits(), deployment=DEPLOYMENT, handler=FakeEngine(tokens=2))
        await server.start("127.0.0.1", local_socket=True)
        path, mode = server.local_socket, stat.S_IMODE(os.stat(server.local_socket).st_mode)
        directory = GateDirectory(lister=lambda app, dep: [("r-1", "127.0.0.1", server.port, b"1")],
                                  secret=lambda: SECRET.hex())
        directory.watch("app", DEPLOYMENT)
        directory.apply(directory.fetch())
        report = directory.report()["local_socket"]
        # Nothing listens on this gate's TCP port: its answers can only come over the socket.
        gate = Gate("r-1", "127.0.0.1", free_port(), SECRET, local_socket=directory.pick("app", DEPLOYMENT).local_socket)
        plain = await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5)
        reply = await gate.request(DEPLOYMENT, request({"messages": ["x"], "stream": True}), 5)
        streamed = b"".join([chunk async for chunk in relay(stream_context(reply))])
        await server.close()
        return path, server.port, mode, report, plain, streamed, os.path.exists(path)

    path, port, mode, report, plain, streamed, left = run(main())
    assert path == os.path.join(sockets, f"engine-127.0.0.1-{port}.sock") and mode == 0o600
    assert report == {DEPLOYMENT: ["r-1"]}
    assert plain.status == 200 and json.loads(plain.body)["id"] == "a"
    assert streamed.count(b'"content"') == 2 and streamed.endswith(DONE.encode())
    assert not left  # the socket goes with the replica


def test_a_local_socket_that_refuses_falls_back_to_tcp_and_a_shared_directory_gets_none(sockets):
    async def main():
        server = await serve(FakeEngine())
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET, local_socket=os.path.join(sockets, "gone.sock"))
        reply = await gate.request(DEPLOYMENT, request({"messages": ["x"]}), 5)
        os.chmod(sockets, 0o755)  # others could enter: no socket there
        shared = StreamServer(SECRET, PortLimits(), deployment=DEPLOYMENT, handler=FakeEngine())
        await shared.start("127.0.0.1", local_socket=True)
        await server.close()
        await shared.close()
        return reply, gate, shared

    reply, gate, shared = run(main())
    assert reply.status == 200 and gate.local_socket is None  # TCP from then on
    assert shared.local_socket is None and shared.port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- directory ----------------------------------------------------------------------------------------


def test_directory_follows_the_listing_and_balances_by_in_flight():
    listing = [("r-1", "10.0.0.1", 7001, b"1"), ("r-2", "10.0.0.2", 7002, b"1")]
    directory = GateDirectory(lister=lambda app, dep: list(listing), secret=lambda: SECRET.hex())
    directory.watch("app", DEPLOYMENT)
    assert directory.pick("app", DEPLOYMENT) is None  # nothing known before the first refresh
    snapshot = directory.fetch()
    assert directory.gates("app", DEPLOYMENT) == []  # fetching (the worker thread's part) changes nothing
    directory.apply(snapshot)
    first = directory.pick("app", DEPLOYMENT)
    first.in_flight = 3
    assert directory.pick("app", DEPLOYMENT).replica != first.replica
    kept = next(g for g in directory.gates("app", DEPLOYMENT) if g.replica == "r-2")
    listing[:] = [("r-2", "10.0.0.2", 7002, b"1"), ("r-3", "10.0.0.3", 7003, b"1")]
    directory.apply(directory.fetch())
    gates = {g.replica: g for g in directory.gates("app", DEPLOYMENT)}
    assert sorted(gates) == ["r-2", "r-3"] and gates["r-2"] is kept
    assert directory.pick("app", DEPLOYMENT, skip=frozenset({"r-2", "r-3"})) is None
    assert directory.pick("app", "engine-unknown") is None


def test_a_replica_whose_heartbeat_stops_is_dropped_and_handed_back_for_removal():
    now = [100.0]
    listing = {"r-live": b"1", "r-dead": b"1"}
    directory = GateDirectory(
        lister=lambda app, dep: [(r, "10.0.0.1", 7000 + i, stamp) for i, (r, stamp) in enumerate(sorted(listing.items()))],
        secret=lambda: SECRET.hex(), stale_after_s=30, clock=lambda: now[0])
    directory.watch("app", DEPLOYMENT)

    def refresh():
        stale = directory.apply(directory.fetch())
        return sorted(g.replica for g in directory.gates("app", DEPLOYMENT)), stale

    assert refresh() == (["r-dead", "r-live"], [])
    for beat in range(2, 5):  # r-live writes its key every 10 s; r-dead was killed and never does
        now[0] += 10
        listing["r-live"] = str(beat).encode()
        assert refresh()[0] == ["r-dead", "r-live"]  # 30 s without a change is not stale yet
    now[0] += 1
    listing["r-live"] = b"5"
    known, stale = refresh()
    assert known == ["r-live"] and stale == [("app", DEPLOYMENT, "r-dead", "10.0.0.1", 7000)]
    assert directory.report()["expired_replicas"] == 1


def test_a_directory_without_the_secret_sends_nothing_direct():
    def unreachable_gcs():
        raise ConnectionError("GCS down")

    directory = GateDirectory(lister=lambda app, dep: [("r-1", "10.0.0.1", 7001, b"1")], secret=unreachable_gcs)
    directory.watch("app", DEPLOYMENT)
    directory.apply(directory.fetch())
    assert directory.pick("app", DEPLOYMENT) is None


def test_engine_counts_a_stream_once_and_tells_finished_from_cancelled():
    from deployments.engine import _CountedStream

    async def events(n, fail=False):
        for i in range(n):
            yield f"data: {i}\n\n"
        if fail:
            raise RuntimeError("engine died")
        yield "data: [DONE]\n\n"

    async def main():
        closes = []
        done = _CountedStream(events(2), closes.append)
        assert [e async for e in done] == ["data: 0\n\n", "data: 1\n\n", "data: [DONE]\n\n"]
        await done.aclose()  # a second close does not count twice
        cut = _CountedStream(events(5), closes.append)
        assert await cut.__anext__() == "data: 0\n\n"
        await cut.aclose()  # the client went away after one event
        broken = _CountedStream(events(1, fail=True), closes.append)
        with pytest.raises(RuntimeError):
            async for _ in broken:
                pass
        never = _CountedStream(events(1), closes.append)
        await never.aclose()  # parked, never claimed
        return closes

    assert asyncio.run(main()) == [True, False, False, False]


def test_usage_is_read_after_non_ascii_text_and_with_any_spacing():
    from serve_app.pipeline.relay import usage_of

    body = json.dumps({"choices": [{"message": {"content": "é€😀" * 50}}],
                       "usage": {"prompt_tokens": 21, "completion_tokens": 4}}, ensure_ascii=False).encode()
    assert usage_of(body) == (21, 4)  # a byte offset used on the decoded text missed it
    assert usage_of(b'{"usage" :{"prompt_tokens":1}}') is None  # (not the key vLLM writes)
    assert usage_of(b'{"usage":  {"prompt_tokens": 2, "completion_tokens": 3}}') == (2, 3)
    assert usage_of(b'{"usage":null}') is None and usage_of(None) is None


def test_a_sites_usage_that_is_not_a_count_is_not_believed():
    """An external API's answer is not ours to trust: a negative, fractional, huge, boolean or
    non-numeric count is no usage (the outcome sink then settles on its own estimate), never a
    refund, an absurd bill, or an exception in the relay."""
    from serve_app.pipeline.relay import usage_of

    for bad in (-5, 1.5, 10**30, True, "12", [1], {"n": 1}, "Infinity"):
        assert usage_of(json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": bad}}).encode()) is None, bad
        assert usage_of(json.dumps({"usage": {"prompt_tokens": bad, "completion_tokens": 3}}).encode()) is None, bad
    assert usage_of(b'{"usage": {"prompt_tokens": 3, "completion_tokens": Infinity}}') is None
    assert usage_of(b'{"usage": {"prompt_tokens": 7}}') == (7, 0)  # absent is none used


class EndlessEvent:
    """A FAKE site's stream: ``prefix``, then an event that never ends, 64 KiB per read."""

    def __init__(self, prefix: bytes = b""):
        self.prefix, self.reads = prefix, 0

    async def read(self, _n: int) -> bytes:
        self.reads += 1
        if self.reads == 1 and self.prefix:
            return self.prefix
        return b"data: " + b"x" * (65536 - 6)


def test_an_event_that_never_ends_is_bounded_before_and_after_the_first_token(monkeypatch):
    """A broken or hostile site (an external API is not ours) streams one event without end: before
    the first event it is a transport failure, after it the stream ends with an error event; either
    way after about MAX_EVENT_BYTES, not never."""
    from serve_app.pipeline import relay as relay_module
    from serve_app.transport import base

    monkeypatch.setattr(base, "MAX_EVENT_BYTES", 1 << 20)
    monkeypatch.setattr(relay_module, "MAX_EVENT_BYTES", 1 << 20)

    async def first_never_ends():
        stream = EngineStream(EndlessEvent(), None, "ext-1")
        with pytest.raises(TransportError, match="first event of over"):
            await stream.read_first()
        return stream.reader.reads

    async def later_never_ends():
        reader = EndlessEvent(prefix=token_event(0).encode())
        reply = EngineReply(200, "ext-1", stream=EngineStream(reader, None, "ext-1"))
        body, ctx = await relay_all(reply)
        return body, ctx, reader.reads

    assert 16 <= run(first_never_ends()) <= 18
    body, ctx, reads = run(later_never_ends())
    assert 16 <= reads <= 18
    assert body.startswith(token_event(0).encode()) and b'"engine_error"' in body and ctx.summary.failed


def test_event_ends_split_between_two_reads_are_found():
    class Pieces:
        def __init__(self, pieces):
            self.pieces = list(pieces)

        async def read(self, _n):
            return self.pieces.pop(0) if self.pieces else b""

    whole = (token_event(0) + token_event(1) + DONE).encode()
    first_end = whole.index(b"\n\n")
    second_end = whole.index(b"\n\n", first_end + 2)
    # cut inside the second event's "\n\n", then one byte at a time for a while
    pieces = [whole[:second_end + 1]] + [whole[i:i + 1] for i in range(second_end + 1, second_end + 20)] + \
        [whole[second_end + 20:]]
    reply = EngineReply(200, "r-1", stream=EngineStream(Pieces(pieces), None, "r-1"))
    body, ctx = run(relay_all(reply))
    assert body == whole and not ctx.summary.failed and ctx.summary.events == 2
