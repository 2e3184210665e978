"""The owner of every request's resources: the request's own ASGI call.

A pure ASGI middleware, outermost: the gateway registers each request's context in the scope,
and when the ASGI call ends, however it ends (answered, an error, the client gone before or
during the stream, the task cancelled), the context is closed: its lease, engine connection and
everything a stage registered are given back exactly once, and its outcome is reported. This
holds even for a streaming response that Starlette cancels before its body iterator ever ran,
which a generator's ``finally`` (or a ``__del__``) cannot promise.
"""

from __future__ import annotations

OWNER_KEY = "spillway.owned"


class RequestOwner:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owned: list = []
        scope[OWNER_KEY] = owned
        try:
            await self.app(scope, receive, send)
        finally:
            for ctx in owned:
                ctx.close()


def owned(request) -> list:
    """The list a request's contexts go in (created by ``RequestOwner`` for this request)."""
    return request.scope.setdefault(OWNER_KEY, [])
