"""The OpenAI routes that carry tokens (chat, completions, embeddings), served as plain ASGI.

Every token of every stream passes here, so these three routes skip what FastAPI and Starlette
add around a handler: route matching against every route, dependency solving, an exit stack, two
exception wrappers around ``send`` for every chunk, and the anyio task group a
``StreamingResponse`` opens per request to hear a disconnect: about 100 us of CPU per 64-chunk
stream and 18 us per plain answer (``benchmarks/edge_micro.py``), a small share of what the router
spends per token but spent on nothing. The request itself goes to the same gateway; errors go
through the same translation as every other route (``errors.error_response``).
Everything else (models, health, reports, admin, console) stays on FastAPI.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from serve_app.http.errors import error_response
from serve_app.http.listener import StreamEdge
from serve_app.http.owner import OWNER_KEY
from serve_app.pipeline.relay import DONE_EVENT
from serve_app.pipeline.schema import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS

OPENAI_POSTS = {"/v1/chat/completions": ENDPOINT_CHAT, "/v1/completions": ENDPOINT_COMPLETIONS,
                "/v1/embeddings": ENDPOINT_EMBEDDINGS}
SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"


class Edge:
    """ASGI: the token routes to ``gateway``, everything else to ``app`` (FastAPI). Sits inside
    ``RequestOwner``, which closes each request's context however the call ends."""

    def __init__(self, gateway, app):
        self.gateway = gateway
        self.app = app
        self._site = {"x-spillway-site": gateway.router_site}

    async def __call__(self, scope, receive, send) -> None:
        endpoint = OPENAI_POSTS.get(_route_path(scope)) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if scope["method"] != "POST":  # answered as FastAPI's routing answered it
            response = error_response(request, StarletteHTTPException(405), self._site)
        else:
            try:
                response = await self.gateway.handle(request, endpoint, scope.setdefault(OWNER_KEY, []))
            except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error body
                response = error_response(request, exc, self._site)
        await response(scope, receive, send)


class SSEResponse(Response):
    """A stream of SSE bytes: each chunk is sent as it comes (or written past ASGI by a splice,
    ``pipeline/splice.py``, when our own listener serves the client). A client that goes away
    cancels the stream (one small task listens for the disconnect; Serve's own ingress also
    cancels the request), and the chunks' generator is closed on every exit, so its ``finally``
    always runs. The chunk ending with ``data: [DONE]`` goes out with the end of the chunked body."""

    def __init__(self, chunks: Callable[[StreamEdge | None], AsyncIterator[bytes]], headers: dict[str, str],
                 status_code: int = 200):
        self.make_chunks = chunks  # given the client's edge when our own listener serves it (a splice)
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-type", SSE_CONTENT_TYPE),
                            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]

    async def __call__(self, scope, receive, send) -> None:
        chunks = self.make_chunks(StreamEdge.of(scope))
        task, finished = asyncio.current_task(), False

        def client_gone(watch: asyncio.Task) -> None:
            if not finished and not watch.cancelled() and watch.exception() is None:
                task.cancel()

        watch = asyncio.get_running_loop().create_task(_until_disconnect(receive))
        watch.add_done_callback(client_gone)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in chunks:
                if finished:
                    continue  # (nothing follows [DONE]; the source runs to its own end)
                # The chunk that ends with [DONE] also ends the response: one write, not two. From
                # here a client that leaves changes nothing.
                finished = chunk.endswith(DONE_EVENT)
                await send({"type": "http.response.body", "body": chunk, "more_body": not finished})
            if not finished:
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancel (the client left) ends the response quietly; any other is passed on.
            if watch.done() and not watch.cancelled() and task.uncancel() == 0:
                return
            raise
        finally:
            finished = True
            watch.cancel()
            await chunks.aclose()  # the generator's finally runs now, not when it is collected


def _route_path(scope) -> str:
    """The path below the app's route prefix (Serve's ``route_prefix`` arrives as ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        return path[len(root):]
    return path


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
