"""Relaying an engine's SSE stream to the client.

Bytes pass through as the socket delivers them: one read may hold several events when the router
is behind (coalescing only then, never on a timer). Only complete events are forwarded; a
partial event waits for its end, up to ``MAX_EVENT_BYTES``. The usage event is read for metrics
and dropped when the client did not ask for it. A stream that ends without ``[DONE]`` ends with
an explicit error event, never a silent truncation. The engine connection goes back to its pool
after a clean ``[DONE]`` and is closed otherwise (the engine then aborts the request); the
request's context gives back the rest (``context.py``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from serve_app.errors import error_body
from serve_app.pipeline.context import OUTCOME_CANCELLED, OUTCOME_OK, STATUS_CLIENT_CLOSED, RequestContext
from serve_app.transport.base import MAX_EVENT_BYTES  # (past it the stream ends with an error event)

logger = logging.getLogger("spillway.relay")

READ_BYTES = 1 << 16
DONE_EVENT = b"data: [DONE]\n\n"
USAGE_ONLY_MARK = b'"choices":[]'
USAGE_KEY = b'"usage":'
# No request holds a billion tokens; a larger count (or a negative one, or a string) from a site is
# not believed, so it can neither bill a tenant absurdly nor overflow the ledger's 64-bit sums.
MAX_REPORTED_TOKENS = 10**9
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
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None  # not counts: the outcome sink settles on its own estimate instead
    return prompt, completion


def _count(value) -> int | None:
    """A token count as a site reports it (an external API is not ours to trust): a whole number
    from 0 to ``MAX_REPORTED_TOKENS``; absent is 0; anything else None."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED_TOKENS:
        return None
    return value


async def relay(ctx: RequestContext) -> AsyncIterator[bytes]:
    stream, summary, lease = ctx.reply.stream, ctx.summary, ctx.lease
    pending = bytearray()  # the start of an event whose end has not come yet
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
            if pending:  # appended in place and searched from the join, so a long event costs linear time
                start = len(pending) - 1  # (pending holds no event end; one may straddle the reads)
                pending += data
                buffer = pending
            else:
                start, buffer = 0, data
            cut = buffer.rfind(b"\n\n", start)
            if cut < 0:
                if len(buffer) > MAX_EVENT_BYTES:
                    logger.warning("request %s: an event of over %d bytes from replica %s; stream ended",
                                   ctx.request_id, MAX_EVENT_BYTES, ctx.reply.replica)
                    break
                if buffer is data:
                    pending += data
                data = None
                continue
            if buffer is pending:
                complete = bytes(pending[:cut + 2])
                del pending[:cut + 2]
            else:
                complete = data[:cut + 2]
                pending += data[cut + 2:]
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
