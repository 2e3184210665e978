"""The HTTP edge's own cost per streamed request: Spillway's plain-ASGI token routes against the
FastAPI route + ``StreamingResponse`` they replaced, measured in the same run.

    .venv/bin/python benchmarks/edge_micro.py                 # 64 chunks per request
    .venv/bin/python benchmarks/edge_micro.py --chunks 1 --plain   # a non-streamed answer

Both edges call the same stub gateway (it reads the body and answers ``--chunks`` SSE chunks
that are already made) and are driven straight through ASGI as uvicorn drives them (spec 2.3: a
disconnect is heard through ``receive``). What is timed is only what the edge adds: routing,
the response object, the wrappers around ``send``, the disconnect listener. Rounds alternate
A B B A so a drifting machine weighs on both alike; the figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve_app.http import errors
from serve_app.http.edge import Edge, SSEResponse
from serve_app.http.owner import RequestOwner, owned

CHUNK = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
         "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
         "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]}


class StubGateway:
    router_site = "onprem"

    def __init__(self, chunks: int, plain: bool, streaming_class):
        self.chunks, self.plain, self.streaming_class = chunks, plain, streaming_class

    async def handle(self, request, endpoint: str, owner: list):
        await request.body()
        if self.plain:
            return JSONResponse({"ok": True})
        return self.streaming_class(self._events, {"x-spillway-site": "onprem"})

    async def _events(self, edge=None):
        for _ in range(self.chunks):
            yield CHUNK


def fastapi_edge(gateway: StubGateway):
    """The edge as it was: a FastAPI route returning Starlette's ``StreamingResponse``."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(api, gateway.router_site)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat", owned(request))

    return RequestOwner(api)


def streaming_response(events, headers):
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def one_request(app) -> int:
    done = asyncio.Event()
    body_sent = False
    sent = 0

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal sent
        sent += 1
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(dict(SCOPE), receive, send)
    return sent


async def measure(app, requests: int) -> float:
    """CPU microseconds per request."""
    for _ in range(20):
        await one_request(app)
    started = time.process_time()
    for _ in range(requests):
        await one_request(app)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--plain", action="store_true", help="a non-streamed JSON answer instead of a stream")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    before = fastapi_edge(StubGateway(args.chunks, args.plain, streaming_response))
    after = RequestOwner(Edge(StubGateway(args.chunks, args.plain, SSEResponse), FastAPI()))
    figures: dict[str, list[float]] = {"fastapi": [], "edge": []}

    async def run():
        for rnd in range(args.rounds):
            order = [("fastapi", before), ("edge", after)]
            for name, app in order if rnd % 2 == 0 else order[::-1]:
                figures[name].append(await measure(app, args.requests))

    asyncio.run(run())
    old, new = statistics.median(figures["fastapi"]), statistics.median(figures["edge"])
    what = "a plain JSON answer" if args.plain else f"a stream of {args.chunks} chunks"
    print(f"HTTP edge, CPU per request ({what}; median of {args.rounds} rounds of {args.requests}):")
    print(f"  FastAPI route + StreamingResponse: {old:8.1f} us   rounds {', '.join(f'{v:.1f}' for v in figures['fastapi'])}")
    print(f"  plain-ASGI edge (Spillway):        {new:8.1f} us   rounds {', '.join(f'{v:.1f}' for v in figures['edge'])}")
    chunks = max(1, 0 if args.plain else args.chunks)
    print(f"  saved: {old - new:.1f} us per request ({(old - new) / chunks:.2f} us per chunk), ratio {new / old:.2f}x")


if __name__ == "__main__":
    main()
