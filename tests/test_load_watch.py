"""Load watches without Ray: the real EngineServer's sequence book (no vLLM started) behind the
real engine port, the router's real Gate and Fleet. A router that waits for room must hear of
another router's releases when they happen, not at its next poll (``load_poll_interval_ms`` is a
minute here, so only the watch can explain a prompt update)."""

from __future__ import annotations

import asyncio
import time

from deployments.engine import EngineServer
from deployments.stream_server import PortLimits, StreamServer
from deployments import wire
from serve_app.config import ModelConfig, SiteConfig, SpillwayConfig
from serve_app.pipeline.gateway import Gateway
from serve_app.policy.placement import RequestView
from serve_app.transport.direct import Gate, GateDirectory
from tests.test_engine_port import SECRET
from tests.test_request_path import FakeHandle

MODEL, SLOTS = "m", 4


def engine_book() -> EngineServer:
    """The real EngineServer, never started: only its sequence book and its releases are used."""
    model = ModelConfig(id=MODEL, source="builtin:dense", replicas={"onprem": 1}, engine={"max_num_seqs": SLOTS})
    return EngineServer(model, SiteConfig(name="onprem", resource="site:onprem", kind="onprem"), "/nonexistent")


async def engine_port(book: EngineServer) -> StreamServer:
    server = StreamServer(SECRET, PortLimits(), deployment="engine-onprem", stats=book.stats,
                          wait_release=book.released_since)
    await server.start("127.0.0.1")
    return server


async def watched_engine() -> tuple[EngineServer, StreamServer, Gate]:
    """An engine's book behind its port, and a router's gate to it."""
    book = engine_book()
    server = await engine_port(book)
    return book, server, Gate("r-1", "127.0.0.1", server.port, SECRET)


async def until(condition, timeout_s: float = 5.0) -> float:
    """Seconds until ``condition()`` held (fails past ``timeout_s``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def run(coro):
    return asyncio.run(coro)


def test_a_watch_is_answered_when_sequences_are_released():
    async def main():
        book, server, gate = await watched_engine()
        book._enter(2)
        first = await gate.stats(5, after=None)  # no watch: answered at once
        watch = asyncio.ensure_future(gate.stats(5, after=first["releases"], wait_s=30))
        await asyncio.sleep(0.05)
        pending_before_release = not watch.done()
        book._leave(2)
        seconds = await until(watch.done)
        report = watch.result()
        await server.close()
        return first, pending_before_release, report, seconds

    first, pending_before_release, report, seconds = run(main())
    assert first["sequences"] == 2 and first["releases"] == 0
    assert pending_before_release  # nothing changed: the engine holds the answer
    assert report["sequences"] == 0 and report["releases"] == 1
    assert seconds < 5  # the release answered it, not its 30 s wait


def test_a_watch_is_answered_at_once_when_it_is_stale_and_after_its_wait_otherwise():
    async def main():
        book, server, gate = await watched_engine()
        book._enter(1)
        book._leave(1)  # releases is 1 now: a watch from 0 missed it and returns at once
        started = time.monotonic()
        stale = await gate.stats(5, after=0, wait_s=30)
        stale_s = time.monotonic() - started
        started = time.monotonic()
        quiet = await gate.stats(5, after=1, wait_s=0.3)
        quiet_s = time.monotonic() - started
        await server.close()
        return stale, stale_s, quiet, quiet_s

    stale, stale_s, quiet, quiet_s = run(main())
    assert stale["releases"] == 1 and stale_s < 5
    assert quiet["releases"] == 1 and 0.25 <= quiet_s < 5


def test_hostile_watch_payloads_are_answered_at_once():
    async def main():
        book = engine_book()
        server = await engine_port(book)
        answers = []
        for payload in (b"not json", b"[1, 2]", b'{"after": "x", "wait_ms": 1}', b'{"after": 0, "wait_ms": NaN}',
                        b'{"after": 0}', b'{"after": 0, "wait_ms": 1e999}' + b" " * 300):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            started = time.monotonic()
            writer.write(wire.pack(wire.KIND_STATS, SECRET, payload))
            line = await asyncio.wait_for(reader.readline(), 5)
            answers.append((bool(line), time.monotonic() - started))
            writer.close()
        await server.close()
        return answers

    for answered, seconds in run(main()):
        assert answered and seconds < 2


def test_a_waiting_router_is_admitted_when_another_router_releases():
    """Router A's scheduler sees the engine full with another router's sequences; when that
    router's request ends on the engine, A's queued request gets its lease at once."""
    cfg = SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"}],
        "models": [{"id": MODEL, "source": "builtin:dense", "replicas": {"onprem": 1},
                    "engine": {"max_num_seqs": SLOTS}, "queue": {"max_wait_ms": 30_000}}],
        "router": {"load_poll_interval_ms": 60_000},
    })

    async def main():
        book = engine_book()
        server = await engine_port(book)
        listing = {"engine-onprem": [("r-1", "127.0.0.1", server.port, b"1")]}
        directory = GateDirectory(lister=lambda app, dep: listing[dep], remover=lambda *a: None,
                                  secret=lambda: SECRET.hex())
        gateway = Gateway(cfg, {MODEL: {"onprem": FakeHandle("engine-onprem")}}, directory=directory)
        directory.apply(directory.fetch())  # after the fleet named the deployments it watches
        scheduler = gateway.schedulers[MODEL]
        group = next(iter(scheduler.groups))
        book._enter(SLOTS)  # another router's requests fill the engine
        gateway.fleet.start()
        await until(lambda: scheduler.others_in_flight[group] == SLOTS)
        waiting = asyncio.ensure_future(scheduler.acquire(RequestView("a", MODEL)))
        await asyncio.sleep(0.05)
        queued_while_full = not waiting.done()
        book._leave(1)  # the other router's request ends
        seconds = await until(waiting.done)
        lease = waiting.result()
        lease.release()
        await gateway.close()
        await server.close()
        return queued_while_full, seconds, lease

    queued_while_full, seconds, lease = run(main())
    assert queued_while_full
    assert lease.group.site == "onprem"
    assert seconds < 5  # the load watch, not the 60 s poll
