"""The whole request path without Ray: the real ASGI app (routes, request owner, error
translation), the real gateway and stages, the real fleet and direct transport, in front of FAKE
engines behind real engine ports on localhost. Client disconnects are delivered the way Starlette
consumes them: ``receive()`` returns ``http.disconnect``.

What is checked: every lease is released exactly once, whatever happens (success, an error, a
client gone before the first byte or mid-stream, the request task cancelled); failures are per
replica and only for transport or engine failures; a client's bad input never touches engine
health; an abandoned non-streamed request is aborted on the engine.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from deployments.stream_server import PortLimits, StreamServer
from serve_app.config import SpillwayConfig
from serve_app.http.routes import build_api
from serve_app.pipeline.gateway import Gateway
from serve_app.router.scheduler import ModelScheduler
from serve_app.transport.direct import GateDirectory
from tests.test_engine_port import ERROR_EVENT, SECRET, FakeEngine

MODEL = "m"
APP = "app"


class RecordingMetrics:
    """Stands in for the Ray metrics backend: records what the outcome sink reports."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, *args))

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)


class FakeHandle:
    """A FAKE Serve handle: names the deployment; its stats answer the health probe; a Serve call
    through it fails as one does when no replica of the deployment is left."""

    def __init__(self, deployment: str):
        self.app_name, self.deployment_name = APP, deployment
        self.calls = 0

    def options(self, **_):
        handle = self

        class _Call:
            def __aiter__(self):
                return self

            async def __anext__(self):
                raise ConnectionError("no replica of the deployment is reachable")

            def cancel(self):
                pass

        class _Method:
            def remote(self, *args):
                handle.calls += 1
                return _Call()

        class _Options:
            open = generate = _Method()

        return _Options()

    @property
    def stats(self):
        handle = self

        class _Remote:
            async def remote(self):
                return {"model": MODEL, "deployment": handle.deployment_name, "in_flight": 0}

        return _Remote()


def config(onprem_replicas=2, slots=4, **router) -> SpillwayConfig:
    return SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1}],
        "models": [{"id": MODEL, "source": "builtin:dense", "replicas": {"onprem": onprem_replicas, "cloud": 1},
                    "engine": {"max_num_seqs": slots}, "spill_after_ms": 10_000, "queue": {"max_wait_ms": 30_000}}],
        "router": {"load_poll_interval_ms": 60_000, "replica_cooldown_s": 30, "first_response_timeout_s": 30,
                   "inline_scan_max_bytes": 1 << 20, **router},
    })


class Cluster:
    """FAKE engines on real ports: ``onprem-0``, ``onprem-1`` (when two) and ``cloud-0``."""

    def __init__(self, engines: dict[str, FakeEngine], cfg: SpillwayConfig, ledger=None):
        self.engines, self.config, self.ledger = engines, cfg, ledger
        self.dead: set[str] = set()
        self.servers: dict[str, StreamServer] = {}

    async def __aenter__(self):
        for replica, engine in self.engines.items():
            engine.replica = replica
            deployment = f"engine-{replica.split('-')[0]}"
            server = StreamServer(SECRET, PortLimits(), deployment=deployment, handler=engine,
                                  engine_dead=lambda r=replica: r in self.dead)
            await server.start("127.0.0.1")
            self.servers[replica] = server
        listing = {f"engine-{site}": [(r, "127.0.0.1", s.port, b"1") for r, s in self.servers.items()
                                      if r.startswith(site)] for site in ("onprem", "cloud")}
        self.directory = GateDirectory(lister=lambda app, dep: listing[dep], remover=lambda *a: None,
                                       secret=lambda: SECRET.hex())
        self.metrics = RecordingMetrics()
        handles = {MODEL: {site: FakeHandle(f"engine-{site}") for site in ("onprem", "cloud")}}
        self.gateway = Gateway(self.config, handles, ledger=self.ledger, metrics=self.metrics,
                               directory=self.directory)
        self.directory.apply(self.directory.fetch())
        self.releases: Counter = Counter()
        scheduler: ModelScheduler = self.gateway.schedulers[MODEL]
        original = scheduler.release

        def counting_release(lease, engine_full=False):
            self.releases[lease] += 1  # keyed by the lease itself: an id can be reused once it is collected
            original(lease, engine_full)

        scheduler.release = counting_release
        self.app = build_api(self.gateway)
        return self

    async def __aexit__(self, *exc):
        await self.gateway.close()
        for server in self.servers.values():
            await server.close()

    @property
    def scheduler(self) -> ModelScheduler:
        return self.gateway.schedulers[MODEL]

    def all_released_once(self) -> bool:
        return all(count == 1 for count in self.releases.values()) and sum(self.scheduler.in_flight.values()) == 0


class Exchange:
    """One HTTP exchange driven straight through ASGI."""

    def __init__(self, body: dict | bytes, path="/v1/chat/completions", headers=None, disconnect_after_chunks=None,
                 disconnect_at_once=False, method="POST", query=""):
        self.raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.path, self.headers = path, headers or {}
        self.method, self.query = method, query
        self.disconnect_after_chunks, self.disconnect_at_once = disconnect_after_chunks, disconnect_at_once
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self._body_read = False

    async def receive(self):
        if not self._body_read:
            self._body_read = True
            if self.disconnect_at_once:
                self.gone.set()
            return {"type": "http.request", "body": self.raw, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)
        chunks = sum(1 for m in self.sent if m["type"] == "http.response.body" and m.get("body"))
        if self.disconnect_after_chunks is not None and chunks >= self.disconnect_after_chunks:
            self.gone.set()

    async def run(self, app):
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                 "query_string": self.query.encode(), "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"),
                             *((k.encode(), v.encode()) for k, v in self.headers.items())]}
        await app(scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def response_headers(self) -> dict:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def chat(stream=False, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def engines(**kwargs) -> dict[str, FakeEngine]:
    return {"onprem-0": FakeEngine(**kwargs), "onprem-1": FakeEngine(**kwargs), "cloud-0": FakeEngine(**kwargs)}


async def wait_for(condition, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def run(coro):
    return asyncio.run(coro)


def test_streamed_and_plain_answers_release_their_lease_exactly_once():
    async def main():
        async with Cluster(engines(), config()) as cluster:
            streamed = await Exchange(chat(stream=True)).run(cluster.app)
            plain = await Exchange(chat()).run(cluster.app)
            return cluster, streamed, plain

    cluster, streamed, plain = run(main())
    assert streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in streamed.body  # the router asked for usage; the client did not
    assert streamed.response_headers["x-spillway-site"] == "onprem"
    assert plain.status == 200 and json.loads(plain.body)["echo"] == [{"role": "user", "content": "hi"}]
    assert len(cluster.releases) == 2 and cluster.all_released_once()
    assert cluster.metrics.count("finished") == 2 and cluster.metrics.count("admitted") == 2
    usages = [call[5] for call in cluster.metrics.calls if call[0] == "served"]
    assert usages == [(7, 3), (5, 2)]  # both answers report their tokens (metrics, cost, the predictor)


def test_a_client_gone_before_the_stream_body_ever_ran_frees_everything():
    """Starlette cancels the streaming task as soon as ``receive()`` says the client is gone,
    possibly before the body iterator started: no generator ``finally`` runs then. The request's
    owner closes it all the same: engine stream aborted, lease released once."""

    async def main():
        async with Cluster(engines(delay_s=0.05, tokens=200), config()) as cluster:
            exchange = await Exchange(chat(stream=True), disconnect_at_once=True).run(cluster.app)
            aborted = await wait_for(lambda: all(s.closed for e in cluster.engines.values() for s in e.streams))
            return cluster, exchange, aborted

    cluster, exchange, aborted = run(main())
    assert aborted and sum(len(e.streams) for e in cluster.engines.values()) == 1
    assert len(cluster.releases) == 1 and cluster.all_released_once()
    assert ("finished", MODEL, "onprem", "cancelled") in cluster.metrics.calls


def test_a_client_gone_mid_stream_aborts_the_engine_and_releases_once():
    async def main():
        async with Cluster(engines(delay_s=0.01, tokens=500), config()) as cluster:
            exchange = await Exchange(chat(stream=True), disconnect_after_chunks=3).run(cluster.app)
            stream = next(s for e in cluster.engines.values() for s in e.streams)
            aborted = await wait_for(lambda: stream.closed)
            return cluster, exchange, aborted

    cluster, exchange, aborted = run(main())
    assert exchange.status == 200 and not exchange.body.endswith(b"[DONE]\n\n")
    assert aborted and cluster.all_released_once()


def test_a_request_task_cancelled_before_the_first_token_frees_everything():
    """Serve cancels the request's task when its client goes away before the response started."""

    async def main():
        async with Cluster(engines(delay_s=5, tokens=1), config()) as cluster:
            task = asyncio.create_task(Exchange(chat(stream=True)).run(cluster.app))
            started = await wait_for(lambda: any(e.streams for e in cluster.engines.values()))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stream = next(s for e in cluster.engines.values() for s in e.streams)
            aborted = await wait_for(lambda: stream.closed)
            return cluster, started, aborted

    cluster, started, aborted = run(main())
    assert started and aborted and len(cluster.releases) == 1 and cluster.all_released_once()


def test_an_abandoned_non_streamed_request_is_aborted_on_the_engine():
    async def main():
        async with Cluster(engines(generate_s=30), config()) as cluster:
            task = asyncio.create_task(Exchange(chat()).run(cluster.app))
            pending = await wait_for(lambda: any(e.pending for e in cluster.engines.values()))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            generation = next(p for e in cluster.engines.values() for p in e.pending)
            aborted = await wait_for(generation.cancelled)
            return cluster, pending, aborted

    cluster, pending, aborted = run(main())
    assert pending and aborted and cluster.all_released_once()


def test_a_dead_engine_fails_over_to_another_replica_and_only_that_replica_cools_down():
    async def main():
        fakes = engines()
        fakes["onprem-0"].first = fakes["onprem-1"].first = [ERROR_EVENT]
        async with Cluster(fakes, config()) as cluster:
            cluster.dead.add("onprem-0")
            fakes["onprem-1"].first = None  # a live engine answers normally
            gates = {g.replica: g for g in cluster.directory.gates(APP, "engine-onprem")}
            gates["onprem-1"].in_flight += 1  # so the first request picks the dead one
            exchanges = [await Exchange(chat(stream=True)).run(cluster.app)]
            gates["onprem-1"].in_flight -= 1
            exchanges += [await Exchange(chat(stream=True)).run(cluster.app) for _ in range(3)]
            capacity = cluster.scheduler.capacity["m@onprem"]
            return cluster, exchanges, gates, capacity

    cluster, exchanges, gates, capacity = run(main())
    assert all(e.status == 200 and e.body.endswith(b"data: [DONE]\n\n") for e in exchanges)
    assert all(e.response_headers["x-spillway-site"] == "onprem" for e in exchanges)
    now = gates["onprem-0"].clock()
    assert not gates["onprem-0"].available(now) and gates["onprem-1"].available(now)
    assert capacity == 4  # one of the two replicas' sequences: the group keeps serving
    assert len(cluster.engines["onprem-0"].streams) == 1 and len(cluster.engines["onprem-1"].streams) == 4
    assert cluster.all_released_once()


def test_an_engine_that_cannot_be_reached_fails_over_to_the_cloud_when_on_prem_is_gone():
    async def main():
        async with Cluster({"onprem-0": FakeEngine(), "cloud-0": FakeEngine()}, config(onprem_replicas=1)) as cluster:
            await cluster.servers["onprem-0"].close()  # the replica's process died
            cluster.servers["onprem-0"]._server = None
            public = await Exchange(chat()).run(cluster.app)
            confidential = await Exchange(chat(), headers={"x-data-classification": "confidential"}).run(cluster.app)
            return cluster, public, confidential

    cluster, public, confidential = run(main())
    assert public.status == 200 and public.response_headers["x-spillway-site"] == "cloud"
    assert public.response_headers["x-spillway-spill-reason"] == "failover"
    assert confidential.status == 503 and json.loads(confidential.body)["error"]["code"] in ("queue_timeout",
                                                                                            "engine_unavailable")
    assert cluster.all_released_once()


def test_a_clients_bad_input_never_touches_engine_health():
    async def main():
        async with Cluster(engines(), config()) as cluster:
            invalid = [await Exchange(chat(invalid=True)).run(cluster.app) for _ in range(5)]
            malformed = [await Exchange(body).run(cluster.app) for body in (
                b'{"model": "m", "messages": 5}', b"[" * 5000 + b"]" * 5000, b'{"model": "m", "t": NaN}',
                {"model": MODEL, "messages": [{"role": "assistant", "tool_calls": True}]})]
            ok = await Exchange(chat()).run(cluster.app)
            down = [g.replica for g in cluster.directory.gates(APP, "engine-onprem") if not g.available(g.clock())]
            return cluster, invalid, malformed, ok, down

    cluster, invalid, malformed, ok, down = run(main())
    assert [e.status for e in invalid] == [400] * 5  # the engine's own validation: relayed, not held against it
    assert [e.status for e in malformed] == [400] * 4
    for exchange in malformed:
        error = json.loads(exchange.body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in exchange.body.decode()
    assert ok.status == 200 and ok.response_headers["x-spillway-spill-reason"] == "none" and down == []
    assert cluster.scheduler.capacity["m@onprem"] == 8 and cluster.all_released_once()


class StalledExchange(Exchange):
    """A client that sends the head and the start of its body, then nothing more (and stays connected)."""

    async def receive(self):
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.raw[:10], "more_body": True}
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_a_body_that_never_finishes_is_a_408_and_holds_up_no_one():
    async def main():
        async with Cluster(engines(), config(body_timeout_s=2)) as cluster:  # (ample for three in-process answers)
            stalled = asyncio.create_task(StalledExchange(chat()).run(cluster.app))
            others = [await Exchange(chat(stream=True)).run(cluster.app) for _ in range(3)]
            still_waiting = not stalled.done()
            return cluster, await asyncio.wait_for(stalled, 10), others, still_waiting

    cluster, stalled, others, still_waiting = run(main())
    assert still_waiting and [e.status for e in others] == [200] * 3  # served while it trickled
    assert stalled.status == 408
    error = json.loads(stalled.body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert "2 s" in error["message"] and cluster.all_released_once() and len(cluster.releases) == 3


def test_bad_headers_and_unknown_models_are_openai_errors_and_counted():
    async def main():
        async with Cluster(engines(), config()) as cluster:
            bad_id = await Exchange(chat(), headers={"x-request-id": "a b"}).run(cluster.app)
            unknown = await Exchange({**chat(), "model": "gpt-17"}).run(cluster.app)
            too_many = await Exchange({**chat(), "n": 5}).run(cluster.app)  # 5 sequences, engines run 4
            return cluster, bad_id, unknown, too_many

    cluster, bad_id, unknown, too_many = run(main())
    assert bad_id.status == 400 and json.loads(bad_id.body)["error"]["param"] == "x-request-id"
    assert unknown.status == 404 and json.loads(unknown.body)["error"]["code"] == "model_not_found"
    assert too_many.status == 400 and json.loads(too_many.body)["error"]["param"] == "n"
    assert cluster.metrics.count("finished") == 3 and cluster.releases == Counter()


def test_router_shutdown_closes_pollers_and_pooled_connections():
    async def main():
        async with Cluster(engines(), config()) as cluster:
            await Exchange(chat()).run(cluster.app)
            gates = cluster.directory.gates(APP, "engine-onprem") + cluster.directory.gates(APP, "engine-cloud")
            pooled = [writer for gate in gates for _, writer, _ in gate.idle]
            tasks = list(cluster.gateway.fleet._tasks)
        return pooled, tasks, gates

    pooled, tasks, gates = run(main())
    assert pooled and all(writer.is_closing() for writer in pooled)
    assert tasks and all(task.done() for task in tasks)
    assert all(gate.idle == [] for gate in gates)


def test_an_engine_that_is_full_sends_requests_back_to_the_queue_not_to_failure():
    """The router believes the group has 4 sequences free; the engine has 2 (another router holds
    the rest). The overflow is refused at once, waits in this router's queue with its arrival
    time, and is served when sequences free: no failure, no cooldown, nothing queued in the engine."""

    async def main():
        fakes = {"onprem-0": FakeEngine(delay_s=0.05, tokens=4, max_sequences=2), "cloud-0": FakeEngine()}
        async with Cluster(fakes, config(onprem_replicas=1)) as cluster:
            exchanges = await asyncio.gather(*(Exchange(chat(stream=True), headers={
                "x-data-classification": "confidential"}).run(cluster.app) for _ in range(4)))
            gate = cluster.directory.gates(APP, "engine-onprem")[0]
            return cluster, exchanges, fakes["onprem-0"], gate

    cluster, exchanges, engine, gate = run(main())
    assert all(e.status == 200 and e.body.endswith(b"data: [DONE]\n\n") for e in exchanges), [
        (e.status, e.body[-200:]) for e in exchanges]
    assert engine.refused >= 2 and len(engine.streams) == 4  # never more than two ran at once
    assert gate.available(gate.clock()) and cluster.scheduler.capacity["m@onprem"] == 4  # not held against it
    queued = [float(e.response_headers["x-spillway-queue-ms"]) for e in exchanges]
    assert sorted(queued)[-1] > 100  # the refused ones waited for the first two, in the router
    assert cluster.all_released_once()
