"""The plain-ASGI token routes (serve_app/http/edge.py): the same answers as FastAPI gave, errors
in OpenAI's format, and a stream whose generator is closed however the response ends."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI

from serve_app.errors import RateLimited
from serve_app.http import errors
from serve_app.http.edge import Edge, SSEResponse
from serve_app.http.owner import RequestOwner


class StubGateway:
    router_site = "onprem"

    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[str, bytes]] = []
        self.closed_streams = 0

    async def handle(self, request, endpoint, owner):
        self.calls.append((endpoint, await request.body()))
        return await self.answer(self)

    async def events(self, count: int, delay_s: float = 0.0):
        try:
            for i in range(count):
                if delay_s:
                    await asyncio.sleep(delay_s)
                yield f"data: {i}\n\n".encode()
        finally:
            self.closed_streams += 1


async def call(app, method="POST", path="/v1/chat/completions", body=b"{}", disconnect_after_chunks=None,
               root_path="", sent: list[dict] | None = None):
    sent = [] if sent is None else sent
    gone = asyncio.Event()
    body_read = False

    async def receive():
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0.001)  # a socket that takes its time: a disconnect lands here, not in the generator
        sent.append(message)
        chunks = sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body"))
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": root_path, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "headers": []}
    await asyncio.wait_for(app(scope, receive, send), 5)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, payload


def app_for(gateway):
    api = FastAPI()
    errors.install(api, gateway.router_site)
    return RequestOwner(Edge(gateway, api))


def test_each_token_route_reaches_the_gateway_with_its_endpoint_and_body():
    async def stream(gw):
        return SSEResponse(lambda edge: gw.events(3), {"x-spillway-site": "cloud"})

    gateway = StubGateway(stream)

    async def main():
        answers = [await call(app_for(gateway), path=path, body=b'{"n":1}')
                   for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")]
        # Deployed under a route prefix (Serve passes it as root_path): the same routes below it.
        return answers + [await call(app_for(gateway), path="/llm/v1/chat/completions", body=b'{"n":1}',
                                     root_path="/llm")]

    answers = asyncio.run(main())
    assert [c[0] for c in gateway.calls] == ["chat", "completions", "embeddings", "chat"]
    assert all(c[1] == b'{"n":1}' for c in gateway.calls)
    for status, headers, payload in answers:
        assert status == 200 and payload == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert headers["content-type"].startswith("text/event-stream") and headers["x-spillway-site"] == "cloud"
    assert gateway.closed_streams == 4


def test_errors_are_openai_bodies_and_an_unexpected_one_shows_no_trace():
    async def refuse(gw):
        raise RateLimited("slow down", retry_after_s=2.4)

    async def crash(gw):
        raise KeyError("internal detail")

    async def main():
        return (await call(app_for(StubGateway(refuse))), await call(app_for(StubGateway(crash))),
                await call(app_for(StubGateway(refuse)), method="GET"),
                await call(app_for(StubGateway(refuse)), path="/v1/nothing"))

    limited, crashed, wrong_method, unknown = asyncio.run(main())
    assert limited[0] == 429 and limited[1]["retry-after"] == "2" and limited[1]["x-spillway-site"] == "onprem"
    assert json.loads(limited[2])["error"]["message"] == "slow down"
    assert crashed[0] == 500 and b"internal detail" not in crashed[2] and b"Traceback" not in crashed[2]
    assert json.loads(crashed[2])["error"]["type"] == "internal_error"
    assert wrong_method[0] == 405 and json.loads(wrong_method[2])["error"]["message"] == "method not allowed"
    assert unknown[0] == 404 and json.loads(unknown[2])["error"]["message"] == "route not found"  # FastAPI's part


def test_a_client_that_leaves_mid_stream_ends_the_response_and_closes_the_generator():
    async def stream(gw):
        return SSEResponse(lambda edge: gw.events(10_000), {})

    gateway = StubGateway(stream)

    async def main():
        answer = await call(app_for(gateway), disconnect_after_chunks=3)
        return answer, gateway.closed_streams  # read before the loop's shutdown could close it

    (status, _, payload), closed = asyncio.run(main())
    assert status == 200 and 3 <= payload.count(b"\n\n") < 10_000
    assert closed == 1  # the generator's finally ran before the call returned


def test_the_done_event_ends_the_chunked_body_in_the_same_message_and_the_source_runs_to_its_end():
    ended = []

    async def events(done: bool):
        yield b"data: 0\n\n"
        yield b"data: 1\n\ndata: [DONE]\n\n" if done else b"data: 1\n\n"
        ended.append(done)  # reached only if the response kept iterating after the last chunk

    async def main():
        messages = {True: [], False: []}
        for done in (True, False):
            async def stream(gw, done=done):
                return SSEResponse(lambda edge: events(done), {})

            await call(app_for(StubGateway(stream)), sent=messages[done])
        return messages

    messages = asyncio.run(main())
    bodies = [(m["body"], m["more_body"]) for m in messages[True] if m["type"] == "http.response.body"]
    assert bodies == [(b"data: 0\n\n", True), (b"data: 1\n\ndata: [DONE]\n\n", False)]
    bodies = [(m["body"], m["more_body"]) for m in messages[False] if m["type"] == "http.response.body"]
    assert bodies == [(b"data: 0\n\n", True), (b"data: 1\n\n", True), (b"", False)]
    assert ended == [True, False]
