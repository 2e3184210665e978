"""Direct requests from the router to an engine replica's stream server, without Ray: a FAKE engine
(an async handler returning a body or an SSE event iterator) behind the real StreamServer, called
by the router's real Gate and relay over localhost sockets."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from deployments.stream_server import StreamServer
from serve_app.ingress import _StreamRelay
from serve_app.router.gates import EngineStream, Gate, GateDirectory, GateUnavailable
from tests.test_stream_relay import USAGE, FakeEngineEvents, token_event

DEPLOYMENT = "engine-fake-onprem"
DONE = "data: [DONE]\n\n"
SECRET = "s3cret" * 8


@dataclass
class FakeOpened:
    status: int
    replica: str
    body: str | None = None
    events: object = None


class FakeEngine:
    """Answers a request whose body has stream=true with events, others with a JSON body; records calls."""

    def __init__(self, delay_s: float = 0.0, fail_after: int | None = None, tokens: int = 3):
        self.calls: list[tuple[str, dict, str]] = []
        self.streams: list[FakeEngineEvents] = []
        self.delay_s, self.fail_after, self.tokens = delay_s, fail_after, tokens

    async def __call__(self, endpoint, body, request_id, trace_headers):
        self.calls.append((endpoint, body, request_id))
        if not body.get("stream"):
            return FakeOpened(200, "r-1", body=json.dumps({"id": request_id, "echo": body["messages"]}))
        events = FakeEngineEvents([token_event(i) for i in range(self.tokens)] + [USAGE, DONE],
                                  delay_s=self.delay_s, fail_after=self.fail_after)
        self.streams.append(events)
        return FakeOpened(200, "r-1", events=events)


async def _server(engine, deployment=DEPLOYMENT) -> StreamServer:
    server = StreamServer(deployment=deployment, handler=engine, secret=SECRET)
    await server.start("127.0.0.1", bind="127.0.0.1")
    return server


async def _relay_all(stream: EngineStream, strip_usage=True):
    finished = []
    chunks = [chunk async for chunk in _StreamRelay(stream, "rid", finished.append, strip_usage=strip_usage)]
    return b"".join(chunks), finished


def _run(coro):
    return asyncio.run(coro)


def test_bodies_and_streams_share_one_pooled_connection():
    async def main():
        engine = FakeEngine()
        server = await _server(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        status, replica, body = await gate.request(DEPLOYMENT, "chat", {"messages": ["hi"]}, "a", None, 5)
        first_conn = gate.idle[-1][1]
        status2, _, stream = await gate.request(DEPLOYMENT, "chat", {"stream": True}, "b", None, 5)
        assert gate.idle == [] and gate.in_flight == 1  # the stream holds the connection
        received, finished = await _relay_all(stream)
        pooled_after_stream = list(gate.idle)
        _, _, body3 = await gate.request(DEPLOYMENT, "chat", {"messages": ["again"]}, "c", None, 5)
        await server.close()
        return (status, replica, body, status2, received, finished, first_conn, pooled_after_stream, body3, gate,
                engine)

    status, replica, body, status2, received, finished, first_conn, pooled, body3, gate, engine = _run(main())
    assert (status, replica, json.loads(body)) == (200, "r-1", {"id": "a", "echo": ["hi"]})
    assert status2 == 200
    assert received == ("".join(token_event(i) for i in range(3)) + DONE).encode()
    assert finished[0].usage == (7, 3) and not finished[0].failed
    assert len(pooled) == 1 and pooled[0][1] is first_conn  # the same connection served all three
    assert json.loads(body3)["id"] == "c" and gate.in_flight == 0
    assert [c[2] for c in engine.calls] == ["a", "b", "c"] and engine.streams[0].closed


def test_a_draining_replica_sends_the_request_elsewhere_and_is_skipped():
    async def main():
        engine = FakeEngine()
        server = await _server(engine)
        assert await server.drain(1.0)
        directory = GateDirectory(lister=lambda app, dep: [("r-1", "127.0.0.1", server.port, b"1")], secret=lambda: SECRET)
        directory.watch("app", DEPLOYMENT)
        directory.refresh()
        gate = directory.pick("app", DEPLOYMENT)
        with pytest.raises(GateUnavailable, match="draining") as info:
            await gate.request(DEPLOYMENT, "chat", {"messages": []}, "a", None, 5)
        assert not info.value.gone  # a draining replica stays listed until it leaves by itself
        after = directory.pick("app", DEPLOYMENT)
        await server.close()
        return engine, gate, after

    engine, gate, after = _run(main())
    assert engine.calls == [] and gate.in_flight == 0
    assert after is None  # skipped for a while: the router uses the Serve call meanwhile


def test_a_replica_of_another_deployment_refuses():
    async def main():
        engine = FakeEngine()
        server = await _server(engine, deployment="engine-other")
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        with pytest.raises(GateUnavailable):
            await gate.request(DEPLOYMENT, "chat", {"messages": []}, "a", None, 5)
        await server.close()
        return engine

    assert _run(main()).calls == []


def test_a_refused_connection_is_unavailable_not_an_error():
    async def main():
        server = await _server(FakeEngine())
        port = server.port
        await server.close()
        removed = []
        directory = GateDirectory(lister=lambda app, dep: [("r-1", "127.0.0.1", port, b"1")],
                                  remover=lambda *gate: removed.append(gate), secret=lambda: SECRET)
        directory.watch("app", DEPLOYMENT)
        directory.refresh()
        gate = directory.pick("app", DEPLOYMENT)
        with pytest.raises(GateUnavailable) as info:
            await gate.request(DEPLOYMENT, "chat", {"messages": []}, "a", None, 5)
        assert info.value.gone  # nothing listens there: the router drops it from the shared list
        directory.forget("app", DEPLOYMENT, gate)
        return gate, removed, directory

    gate, removed, directory = _run(main())
    assert gate.in_flight == 0 and gate.down_until > 0
    assert removed == [("app", DEPLOYMENT, "r-1", "127.0.0.1", gate.port)]
    assert directory.report()["replicas"] == {DEPLOYMENT: []}


def test_a_stale_pooled_connection_is_replaced_transparently():
    async def main():
        engine = FakeEngine()
        server = await _server(engine)

        async def close_at_once(reader, writer):
            writer.close()

        dead_end = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", dead_end.sockets[0].getsockname()[1])
        await asyncio.sleep(0.05)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET, idle=[(reader, writer)])
        status, _, body = await gate.request(DEPLOYMENT, "chat", {"messages": ["x"]}, "a", None, 5)
        dead_end.close()
        await server.close()
        return status, body

    status, body = _run(main())
    assert status == 200 and json.loads(body)["id"] == "a"


def test_client_gone_mid_stream_aborts_the_engine_and_drops_the_connection():
    async def main():
        engine = FakeEngine(delay_s=0.01, tokens=500)
        server = await _server(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        _, _, stream = await gate.request(DEPLOYMENT, "chat", {"stream": True}, "a", None, 5)
        finished = []
        iterator = _StreamRelay(stream, "a", finished.append).__aiter__()
        await iterator.__anext__()
        await iterator.aclose()  # what Starlette does when the client goes away
        for _ in range(100):
            if engine.streams[0].closed:
                break
            await asyncio.sleep(0.02)
        drained = await server.drain(2.0)
        await server.close()
        return engine, gate, finished, drained

    engine, gate, finished, drained = _run(main())
    assert engine.streams[0].closed and finished[0].failed
    assert gate.idle == [] and gate.in_flight == 0 and drained


def test_engine_failure_mid_stream_ends_with_an_error_event_and_no_reuse():
    async def main():
        server = await _server(FakeEngine(fail_after=2, tokens=5))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        _, _, stream = await gate.request(DEPLOYMENT, "chat", {"stream": True}, "a", None, 5)
        received, finished = await _relay_all(stream)
        await server.close()
        return received, finished, gate

    received, finished, gate = _run(main())
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[:2] == [token_event(0).strip(), token_event(1).strip()]
    assert json.loads(events[-1][6:])["error"]["type"] == "engine_error"
    assert finished[0].failed and gate.idle == [] and gate.in_flight == 0


def test_drain_waits_for_running_direct_streams():
    async def main():
        server = await _server(FakeEngine(delay_s=0.05, tokens=6))
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        _, _, stream = await gate.request(DEPLOYMENT, "chat", {"stream": True}, "a", None, 5)
        relay = asyncio.ensure_future(_relay_all(stream))
        await asyncio.sleep(0.05)
        not_yet = await server.drain(0.01)  # still streaming
        done = await server.drain(5.0)
        received, finished = await relay
        await server.close()
        return not_yet, done, received, finished

    not_yet, done, received, finished = _run(main())
    assert not not_yet and done
    assert received.endswith(DONE.encode()) and not finished[0].failed


def test_directory_follows_the_listing_and_balances_by_in_flight():
    listing = [("r-1", "10.0.0.1", 7001, b"1"), ("r-2", "10.0.0.2", 7002, b"1")]
    directory = GateDirectory(lister=lambda app, dep: list(listing), secret=lambda: SECRET)
    directory.watch("app", DEPLOYMENT)
    assert directory.pick("app", DEPLOYMENT) is None  # nothing known before the first refresh
    directory.refresh()
    first = directory.pick("app", DEPLOYMENT)
    first.in_flight = 3
    assert directory.pick("app", DEPLOYMENT).replica != first.replica
    kept = directory._gates[("app", DEPLOYMENT)]["r-2"]
    listing[:] = [("r-2", "10.0.0.2", 7002, b"1"), ("r-3", "10.0.0.3", 7003, b"1")]
    directory.refresh()
    gates = directory._gates[("app", DEPLOYMENT)]
    assert sorted(gates) == ["r-2", "r-3"] and gates["r-2"] is kept
    assert directory.pick("app", "engine-unknown") is None
    assert directory.report()["replicas"] == {DEPLOYMENT: ["r-2", "r-3"]}


def test_a_replica_whose_heartbeat_stops_is_dropped_and_removed_from_the_list():
    now = [100.0]
    listing = {"r-live": b"1", "r-dead": b"1"}
    ports = {"r-live": 7000, "r-dead": 7001, "r-new": 7002}
    removed = []

    def remove(app, dep, replica, host, port):
        removed.append((replica, port))
        if len(removed) == 1:
            raise ConnectionError("GCS busy")  # the first removal fails
        del listing[replica]

    directory = GateDirectory(
        lister=lambda app, dep: [(r, "10.0.0.1", ports[r], stamp) for r, stamp in listing.items()],
        remover=remove,
        secret=lambda: SECRET, stale_after_s=30, clock=lambda: now[0],
    )
    directory.watch("app", DEPLOYMENT)

    def known():
        directory.refresh()
        return sorted(directory._gates[("app", DEPLOYMENT)])

    assert known() == ["r-dead", "r-live"]
    for beat in range(2, 5):  # r-live writes its key every 10 s; r-dead was killed and never does
        now[0] += 10
        listing["r-live"] = str(beat).encode()
        assert known() == ["r-dead", "r-live"]  # 30 s without a change is not stale yet
    now[0] += 1
    listing["r-live"] = b"5"
    assert known() == ["r-live"] and removed == [("r-dead", 7001)]  # not used, though still listed
    assert directory.report()["expired_replicas"] == 0
    assert known() == ["r-live"] and removed == [("r-dead", 7001)] * 2 and "r-dead" not in listing
    assert directory.report()["expired_replicas"] == 1
    # A replica seen for the first time gets the full time from then, whatever its stamp says.
    listing["r-new"] = b"0"
    assert known() == ["r-live", "r-new"]


def test_a_request_without_the_cluster_secret_gets_nothing():
    async def main():
        engine = FakeEngine()
        server = await _server(engine)
        outsider = Gate("r-1", "127.0.0.1", server.port, "guessed")
        with pytest.raises(GateUnavailable) as info:
            await outsider.request(DEPLOYMENT, "chat", {"messages": ["hi"]}, "a", None, 5)
        await server.close()
        return engine, info.value

    engine, error = _run(main())
    assert engine.calls == [] and not error.gone


def test_a_directory_without_the_secret_sends_nothing_direct():
    def unreachable_gcs():
        raise ConnectionError("GCS down")

    directory = GateDirectory(lister=lambda app, dep: [("r-1", "10.0.0.1", 7001, b"1")], secret=unreachable_gcs)
    directory.watch("app", DEPLOYMENT)
    directory.refresh()
    assert directory.pick("app", DEPLOYMENT) is None


def test_a_long_conversation_goes_direct_too():
    async def main():
        engine = FakeEngine()
        server = await _server(engine)
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        history = [{"role": "user", "content": "x" * 1000}] * 2000  # ~2 MB body, far past a default line limit
        status, _, body = await gate.request(DEPLOYMENT, "chat", {"messages": history}, "a", None, 5)
        await server.close()
        return status, body

    status, body = _run(main())
    assert status == 200 and len(json.loads(body)["echo"]) == 2000
