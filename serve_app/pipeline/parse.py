"""Stage: read the body (bounded), then parse, validate and scan it (``scan.py``, ``scanner.py``)."""

from __future__ import annotations

from serve_app.errors import InvalidRequest
from serve_app.http.body import read_body
from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.scanner import Scanner


class ParseStage:
    name = "parse"

    def __init__(self, scanner: Scanner, max_body_bytes: int, body_timeout_s: float):
        self._scanner = scanner
        self._max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s

    async def run(self, ctx: RequestContext) -> None:
        raw = await read_body(ctx.request, self._max_body_bytes, self._body_timeout_s)
        result = await self._scanner.scan(raw, ctx.endpoint)
        if result.status != 200:
            raise InvalidRequest(result.message, param=result.param)
        ctx.scan = result
