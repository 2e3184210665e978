"""The engine -> router hop's cost per streamed token: TCP against the engine replica's Unix
socket (a router on the same machine), measured in the same run.

    .venv/bin/python benchmarks/engine_hop.py                    # 64 tokens per stream, 16 at once

Both ends in one process, as in production code: the engine replica's real port
(``StreamServer``) serves a stub engine whose stream yields one ready-made SSE event per loop turn
(as vLLM yields one per step), the router's real ``Gate`` sends the request and the real
``relay`` reads the stream. What is timed is the process's CPU per token for the whole exchange;
the difference between the two transports is the socket work of the hop. Rounds alternate
A B B A so a drifting machine weighs on both alike; the figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

try:
    import uvloop  # what Ray runs its replicas' loops on
except ImportError:  # pragma: no cover
    uvloop = None

from deployments import discovery
from deployments.engine import Opened
from deployments.stream_server import PortLimits, StreamServer
from serve_app.observe.tracing import NO_TRACE
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.relay import relay
from serve_app.pipeline.scan import ScanSpec, scan_request
from serve_app.transport.base import EngineRequest
from serve_app.transport.direct import Gate

SECRET = bytes(range(32))
DEPLOYMENT = "engine-bench"
EVENT = ('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
         '"delta":{"content":" word"},"logprobs":null,"finish_reason":null}]}\n\n')
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class StubEngine:
    """Answers every request with ``tokens`` events and [DONE], one event per loop turn."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    async def __call__(self, endpoint, body, request_id, trace_headers, sequences=None):
        return Opened(200, "r-1", events=self._events())

    async def _events(self):
        for _ in range(self.tokens):
            await asyncio.sleep(0)
            yield EVENT
        yield "data: [DONE]\n\n"


def context() -> RequestContext:
    ctx = RequestContext("chat", RequestHeaders("rid"), NO_TRACE)
    ctx.scan = scan_request(json.dumps(BODY).encode(), "chat", ScanSpec())
    return ctx


async def one_stream(gate: Gate) -> int:
    reply = await gate.request(DEPLOYMENT, EngineRequest("chat", json.dumps(BODY).encode(), "rid", True), 30)
    ctx = context()
    ctx.reply = reply
    await reply.stream.read_first()
    return sum([len(chunk) async for chunk in relay(ctx)])


async def measure(gate: Gate, streams: int, concurrency: int, tokens: int) -> float:
    """CPU microseconds per token."""
    async def client(count: int):
        for _ in range(count):
            await one_stream(gate)

    await client(10)
    started = time.process_time()
    await asyncio.gather(*(client(streams // concurrency) for _ in range(concurrency)))
    return (time.process_time() - started) / (streams // concurrency * concurrency * tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sockets = tempfile.mkdtemp(prefix="spw")
    discovery.socket_dir = lambda: sockets  # this run's own directory, not the machine's
    figures: dict[str, list[float]] = {"tcp": [], "unix": []}

    async def run():
        server = StreamServer(SECRET, PortLimits(), deployment=DEPLOYMENT, handler=StubEngine(args.tokens))
        await server.start("127.0.0.1", local_socket=True)
        gates = {"tcp": Gate("r-1", "127.0.0.1", server.port, SECRET),
                 "unix": Gate("r-1", "127.0.0.1", server.port, SECRET, local_socket=server.local_socket)}
        for rnd in range(args.rounds):
            order = ["tcp", "unix"] if rnd % 2 == 0 else ["unix", "tcp"]
            for name in order:
                figures[name].append(await measure(gates[name], args.streams, args.concurrency, args.tokens))
        for gate in gates.values():
            gate.close()
        await server.close()

    if uvloop is not None:
        uvloop.install()
    asyncio.run(run())
    os.rmdir(sockets)
    tcp, unix = statistics.median(figures["tcp"]), statistics.median(figures["unix"])
    print(f"engine -> router hop, CPU per token (both ends; {args.tokens} tokens per stream, {args.concurrency} "
          f"streams at once; median of {args.rounds} rounds of {args.streams} streams):")
    print(f"  TCP (the node's address): {tcp:6.2f} us   rounds {', '.join(f'{v:.2f}' for v in figures['tcp'])}")
    print(f"  Unix socket (same node):  {unix:6.2f} us   rounds {', '.join(f'{v:.2f}' for v in figures['unix'])}")
    print(f"  saved: {tcp - unix:.2f} us per token, ratio {unix / tcp:.2f}x")


if __name__ == "__main__":
    main()
