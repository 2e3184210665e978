"""Relaying an engine's SSE stream to the client.

Bytes pass through as the socket delivers them: one read may hold several events when the router
is behind (coalescing only then, never on a timer). Only complete events are forwarded; a
partial event waits for its end. The usage event is read for metrics and dropped when the client
did not ask for it. A stream that ends without ``[DONE]`` ends with an explicit error event, never
a silent truncation. The engine connection goes back to its pool after a clean ``[DONE]`` and is
closed otherwise (the engine then aborts the request); the request's context gives back the
rest (``context.py``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from serve_app.errors import error_body
from serve_app.pipeline.context import OUTCOME_CANCELLED, OUTCOME_OK, STATUS_CLIENT_CLOSED, RequestContext

logger = logging.getLogger("spillway.relay")

READ_BYTES = 1 << 16
DONE_EVENT = b"data: [DONE]\n\n"
USAGE_ONLY_MARK = b'"choices":[]'
USAGE_KEY = b'"usage":'
OUTCOME_STREAM_FAILED = "stream_failed"
_JSON = json.JSONDecoder()


def usage_of(payload: bytes | None) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a JSON body or an SSE usage event, parsing only the
    usage object (bodies can be large); None when there is none."""
    if not payload:
        return None
    at = payload.rfind(USAGE_KEY)
    if at < 0:
        return None
    tail = payload[at + len(USAGE_KEY):].decode("utf-8", "replace").lstrip()  # a byte offset: slice, then decode
    try:
        usage, _ = _JSON.raw_decode(tail)
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def relay(ctx: RequestContext) -> AsyncIterator[bytes]:
    stream, summary, lease = ctx.reply.stream, ctx.summary, ctx.lease
    pending = b""
    data = stream.head or None  # read ahead by the dispatch stage
    done_seen = False
    try:
        while True:
            if data is None:
                try:
                    data = await stream.reader.read(READ_BYTES)
                except (ConnectionError, OSError) as exc:
                    logger.warning("request %s: engine stream broke: %r", ctx.request_id, exc)
                    data = b""
            if not data:
                break
            now = time.monotonic()
            data, pending = pending + data, b""
            cut = data.rfind(b"\n\n")
            if cut < 0:
                pending, data = data, None
                continue
            complete, pending = data[:cut + 2], data[cut + 2:]
            done_seen = complete.endswith(DONE_EVENT)
            if ctx.captured is not None:
                ctx.captured += complete
            complete = _take_usage(complete, summary, ctx.strip_usage, now)
            if ctx.restorer is not None and complete:
                complete = ctx.restorer.feed(complete)
            if lease is not None:
                lease.tokens_out = summary.events
            if complete:
                yield complete
            if done_seen:
                break  # a direct connection stays open for the next request
            data = None
        if not done_seen:
            logger.warning("request %s: engine stream ended without [DONE]", ctx.request_id)
            summary.failed = True
            body = error_body("the engine failed while streaming; the response is incomplete", "engine_error", 502)
            yield f"data: {json.dumps(body)}\n\n".encode()
    except BaseException:
        summary.failed = True
        ctx.finish(STATUS_CLIENT_CLOSED, OUTCOME_CANCELLED)  # the client went away mid-stream
        raise
    finally:
        stream.close(reusable=done_seen and not pending and not summary.failed)
        ctx.engine_done()
        ctx.finish(200, OUTCOME_STREAM_FAILED if summary.failed else OUTCOME_OK)


def _take_usage(complete: bytes, summary, strip: bool, now: float) -> bytes:
    """Count the content events, read the usage event (and drop it when the client did not ask)."""
    if USAGE_ONLY_MARK not in complete:
        events = complete.count(b"\n\n") - complete.endswith(DONE_EVENT)
        if events:
            summary.events += events
            summary.last_at = now
        return complete
    kept = []
    for event in complete.split(b"\n\n")[:-1]:
        if USAGE_ONLY_MARK in event and USAGE_KEY in event:
            summary.usage = usage_of(event)
            if strip:
                continue
        elif event.startswith(b"data: {"):
            summary.events += 1
            summary.last_at = now
        kept.append(event + b"\n\n")
    return b"".join(kept)
