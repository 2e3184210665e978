"""Relaying an engine's SSE stream to the client.

Bytes pass through as the socket delivers them: one read may hold several events when the router
is behind (coalescing only then, never on a timer). Only complete events are forwarded; a
partial event waits for its end, up to ``MAX_EVENT_BYTES``. The usage event is read for metrics
and dropped when the client did not ask for it. A stream that ends without ``[DONE]`` ends with
an explicit error event, never a silent truncation. The engine connection goes back to its pool
after a clean ``[DONE]`` and is closed otherwise (the engine then aborts the request); the
request's context gives back the rest (``context.py``). When the router's own listener serves the
client, the chunks are spliced from the engine's socket to the client's (``splice.py``) with the
same bookkeeping (``EventCutter``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from serve_app.errors import error_body
from serve_app.pipeline.context import OUTCOME_CANCELLED, OUTCOME_OK, STATUS_CLIENT_CLOSED, RequestContext
from serve_app.pipeline.splice import splice, spliceable
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


class EventCutter:
    """Cuts an engine's bytes into complete SSE events and does the relay's bookkeeping on them:
    the content events counted, the usage event read (and dropped when the client did not ask for
    it), the answer captured, redacted values restored. ``feed`` answers what to forward (possibly
    nothing); it stops at ``[DONE]`` or at an event over ``MAX_EVENT_BYTES``."""

    def __init__(self, ctx: RequestContext):
        self.ctx = ctx
        self.pending = bytearray()  # the start of an event whose end has not come yet
        self.done_seen = False
        self.overflow = False

    @property
    def stopped(self) -> bool:
        return self.done_seen or self.overflow

    def feed(self, data: bytes, now: float) -> bytes:
        ctx, pending = self.ctx, self.pending
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
                self.overflow = True
            elif buffer is data:
                pending += data
            return b""
        if buffer is pending:
            complete = bytes(pending[:cut + 2])
            del pending[:cut + 2]
        else:
            complete = data[:cut + 2]
            pending += data[cut + 2:]
        self.done_seen = complete.endswith(DONE_EVENT)
        if ctx.captured is not None:
            ctx.captured += complete
        complete = _take_usage(complete, ctx.summary, ctx.strip_usage, now)
        if ctx.restorer is not None and complete:
            complete = ctx.restorer.feed(complete)
        if ctx.lease is not None:
            ctx.lease.tokens_out = ctx.summary.events
        return complete


async def relay(ctx: RequestContext, edge=None) -> AsyncIterator[bytes]:
    """The client's chunks of ``ctx``'s engine stream. With ``edge`` (the client's connection, when
    the router's own listener serves it) and a direct engine stream, the chunks go straight from
    the engine's socket to the client's (``splice.py``) and only the last one, with ``[DONE]``, is
    yielded."""
    stream, summary = ctx.reply.stream, ctx.summary
    cutter = EventCutter(ctx)
    try:
        if stream.head:  # read ahead by the dispatch stage
            complete = cutter.feed(stream.head, time.monotonic())
            if complete:
                yield complete
        while not cutter.stopped:
            if edge is not None and spliceable(stream):
                complete = await splice(stream, cutter, edge, ctx.request_id)
                if complete is not None:
                    summary.spliced = True
                    if complete:
                        yield complete
                    break
                edge = None  # the client's connection cannot take it: read as usual
            try:
                data = await stream.reader.read(READ_BYTES)
            except (ConnectionError, OSError) as exc:
                logger.warning("request %s: engine stream broke: %r", ctx.request_id, exc)
                data = b""
            if not data:
                break
            complete = cutter.feed(data, time.monotonic())
            if complete:
                yield complete
        if not cutter.done_seen:
            logger.warning("request %s: engine stream ended without [DONE]", ctx.request_id)
            summary.failed = True
            body = error_body("the engine failed while streaming; the response is incomplete", "engine_error", 502)
            yield f"data: {json.dumps(body)}\n\n".encode()
    except BaseException:
        summary.failed = True
        ctx.finish(STATUS_CLIENT_CLOSED, OUTCOME_CANCELLED)  # the client went away mid-stream
        raise
    finally:
        # A direct connection stays open for the next request after a clean [DONE].
        stream.close(reusable=cutter.done_seen and not cutter.pending and not summary.failed)
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
