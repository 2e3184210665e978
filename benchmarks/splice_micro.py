"""A router's CPU per streamed token with the splice (engine socket -> client socket from the
protocol callback, the default) against the relay through ASGI (a task step and a coroutine chain
per chunk, the baseline), measured in the same run.

    .venv/bin/python benchmarks/splice_micro.py                 # 64 tokens per stream, 16 at once

Everything in one process, as in production code: the engine replica's real port
(``StreamServer``) serves a stub engine yielding one ready-made SSE event per loop turn, the
router's real ``Gate``, ``relay`` and ``SSEResponse`` behind its real listener
(``SharedListener``), and clients reading the chunked answers on raw sockets with keep-alive.
The engine and the clients cost the same in both variants, so the difference is the router's.
Rounds alternate A B B A; the figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time

from engine_hop import DEPLOYMENT, SECRET, StubEngine, uvloop  # (the same stub engine as the hop's benchmark)

from deployments.stream_server import PortLimits, StreamServer
from serve_app.http.edge import SSEResponse
from serve_app.http.listener import SharedListener
from serve_app.observe.tracing import NO_TRACE
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.relay import relay
from serve_app.pipeline.scan import ScanSpec, scan_request
from serve_app.transport.base import EngineRequest
from serve_app.transport.direct import Gate

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-length: %d\r\n\r\n%b" % (len(BODY), BODY)


class RouterStub:
    """The router's streaming answer: one direct engine request, relayed as the gateway relays it
    (``splice`` False: the baseline, every chunk through ASGI)."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.splice = True

    async def __call__(self, scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        reply = await self.gate.request(DEPLOYMENT, EngineRequest("chat", BODY, "rid", True), 30)
        ctx = RequestContext("chat", RequestHeaders("rid"), NO_TRACE)
        ctx.scan = scan_request(BODY, "chat", ScanSpec())
        ctx.reply = reply
        await reply.stream.read_first()
        splice = self.splice
        await SSEResponse(lambda edge: relay(ctx, edge if splice else None), {})(scope, receive, send)


async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(REQUEST)
    while (await reader.readline()) != b"\r\n":
        pass
    size = 1
    while size:
        size = int(await reader.readline(), 16)
        await reader.readexactly(size + 2)
    return 1


async def measure(port: int, streams: int, concurrency: int, tokens: int) -> float:
    """CPU microseconds per token, the whole process."""
    async def client(count: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            await one_answer(reader, writer)
        writer.close()

    await client(10)
    started = time.process_time()
    await asyncio.gather(*(client(streams // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (streams // concurrency * concurrency * tokens) * 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"asgi": [], "splice": []}

    async def run():
        server = StreamServer(SECRET, PortLimits(), deployment=DEPLOYMENT, handler=StubEngine(args.tokens))
        await server.start("127.0.0.1")
        gate = Gate("r-1", "127.0.0.1", server.port, SECRET)
        app, port = RouterStub(gate), free_port()
        listener = SharedListener(app, "127.0.0.1", port, head_timeout_s=30, max_connections=1024,
                                  max_ongoing_requests=1024, grace_s=1)
        await listener.start()
        for rnd in range(args.rounds):
            for name in (["asgi", "splice"] if rnd % 2 == 0 else ["splice", "asgi"]):
                app.splice = name == "splice"
                figures[name].append(await measure(port, args.streams, args.concurrency, args.tokens))
        await listener.close()
        gate.close()
        await server.close()

    if uvloop is not None:
        uvloop.install()
    asyncio.run(run())
    asgi, spliced = statistics.median(figures["asgi"]), statistics.median(figures["splice"])
    print(f"engine -> router -> client, CPU per token of the whole process ({args.tokens} tokens per stream, "
          f"{args.concurrency} streams at once; median of {args.rounds} rounds of {args.streams} streams):")
    print(f"  through ASGI (baseline): {asgi:6.2f} us   rounds {', '.join(f'{v:.2f}' for v in figures['asgi'])}")
    print(f"  spliced (default):       {spliced:6.2f} us   rounds {', '.join(f'{v:.2f}' for v in figures['splice'])}")
    print(f"  saved: {asgi - spliced:.2f} us per token, ratio {spliced / asgi:.2f}x")


if __name__ == "__main__":
    main()
