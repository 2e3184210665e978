"""The direct token stream between an engine replica and the router, without Ray: a FAKE engine
(an async generator of SSE events) parked in the real StreamServer, read by the router's real
relay over a localhost socket."""

from __future__ import annotations

import asyncio
import json

from deployments.stream_server import StreamServer
from serve_app.ingress import EngineStream, StreamSummary, _StreamRelay

USAGE = 'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'


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


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


async def _open(server: StreamServer, token: str) -> EngineStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(token.encode() + b"\n")
    return EngineStream(reader, writer, FakeCall())


def _run(coro):
    return asyncio.run(coro)


def test_events_pass_through_byte_for_byte_and_usage_is_read():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        events = [token_event(i) for i in range(3)] + [USAGE, "data: [DONE]\n\n"]
        engine, done = FakeEngineEvents(events, delay_s=0.01), asyncio.Event()
        token = server.park(engine, done.set)
        finished: list[StreamSummary] = []
        relay = _StreamRelay(await _open(server, token), "r1", finished.append, strip_usage=False)
        received = b"".join([chunk async for chunk in relay])
        await asyncio.wait_for(done.wait(), 5)
        await server.close()
        return received, "".join(events).encode(), finished, engine

    received, sent, finished, engine = _run(main())
    assert received == sent
    assert len(finished) == 1 and not finished[0].failed
    assert finished[0].usage == (7, 3) and finished[0].first_at is not None
    assert engine.closed


def test_usage_is_stripped_when_the_client_did_not_ask():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        token = server.park(FakeEngineEvents([token_event(0), USAGE, "data: [DONE]\n\n"]))
        finished = []
        relay = _StreamRelay(await _open(server, token), "r2", finished.append, strip_usage=True)
        received = b"".join([chunk async for chunk in relay])
        await server.close()
        return received, finished

    received, finished = _run(main())
    assert received == (token_event(0) + "data: [DONE]\n\n").encode()
    assert finished[0].usage == (7, 3)


def test_engine_failure_mid_stream_ends_with_an_error_event():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        token = server.park(FakeEngineEvents([token_event(i) for i in range(5)], fail_after=2))
        finished = []
        relay = _StreamRelay(await _open(server, token), "r3", finished.append)
        chunks = [chunk async for chunk in relay]
        await server.close()
        return b"".join(chunks), finished

    received, finished = _run(main())
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[:2] == [token_event(0).strip(), token_event(1).strip()]
    assert json.loads(events[-1][6:])["error"]["type"] == "engine_error"
    assert finished[0].failed


def test_client_disconnect_closes_the_engine_stream():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        engine, done = FakeEngineEvents([token_event(i) for i in range(1000)], delay_s=0.005), asyncio.Event()
        token = server.park(engine, done.set)
        finished = []
        relay = _StreamRelay(await _open(server, token), "r4", finished.append)
        iterator = relay.__aiter__()
        await iterator.__anext__()
        await iterator.aclose()  # what Starlette does when the client goes away
        await asyncio.wait_for(done.wait(), 5)
        await server.close()
        return engine, finished

    engine, finished = _run(main())
    assert engine.closed and finished[0].failed


def test_unclaimed_stream_expires_and_wrong_token_gets_nothing():
    async def main():
        server = StreamServer(claim_timeout_s=0.2)
        await server.start("127.0.0.1", bind="127.0.0.1")
        engine, done = FakeEngineEvents([token_event(0)]), asyncio.Event()
        server.park(engine, done.set)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"not-the-token\n")
        nothing = await asyncio.wait_for(reader.read(), 5)
        await asyncio.wait_for(done.wait(), 5)
        parked = server.parked
        await server.close()
        return nothing, parked, engine

    nothing, parked, engine = _run(main())
    assert nothing == b"" and parked == 0 and engine.closed


def test_events_split_across_reads_are_forwarded_whole():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        whole = token_event(0) + USAGE + "data: [DONE]\n\n"
        # The engine writes the bytes in awkward pieces: events arrive cut in the middle.
        pieces = [whole[:10], whole[10:70], whole[70:]]
        token = server.park(FakeEngineEvents(pieces, delay_s=0.02))
        finished = []
        relay = _StreamRelay(await _open(server, token), "r5", finished.append, strip_usage=True)
        chunks = [chunk async for chunk in relay]
        await server.close()
        return chunks, finished

    chunks, finished = _run(main())
    assert all(chunk.endswith(b"\n\n") for chunk in chunks)
    assert b"".join(chunks) == (token_event(0) + "data: [DONE]\n\n").encode()
    assert finished[0].usage == (7, 3) and not finished[0].failed


def test_the_engine_starts_before_the_router_claims_the_stream():
    async def main():
        server = StreamServer()
        await server.start("127.0.0.1", bind="127.0.0.1")
        engine = FakeEngineEvents([token_event(0), "data: [DONE]\n\n"])
        token = server.park(engine)
        await asyncio.sleep(0.05)
        started_before_claim = engine.started
        finished = []
        relay = _StreamRelay(await _open(server, token), "r6", finished.append)
        received = b"".join([chunk async for chunk in relay])
        await server.close()
        return started_before_claim, received, finished

    started_before_claim, received, finished = _run(main())
    assert started_before_claim
    assert received == (token_event(0) + "data: [DONE]\n\n").encode() and not finished[0].failed


def test_an_unclaimed_stream_still_waiting_for_its_first_token_is_aborted():
    async def main():
        server = StreamServer(claim_timeout_s=0.1)
        await server.start("127.0.0.1", bind="127.0.0.1")
        # The first token would take 30 s: the claim timeout must cancel that wait, not sit it out.
        engine, done = FakeEngineEvents([token_event(0)], delay_s=30), asyncio.Event()
        server.park(engine, done.set)
        await asyncio.wait_for(done.wait(), 5)
        parked = server.parked
        await server.close()
        return engine, parked

    engine, parked = _run(main())
    assert engine.started and engine.closed and parked == 0


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
        try:
            async for _ in broken:
                pass
        except RuntimeError:
            pass
        never = _CountedStream(events(1), closes.append)
        await never.aclose()  # parked, never claimed
        return closes

    assert asyncio.run(main()) == [True, False, False, False]
