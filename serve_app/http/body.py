"""Reading a request body, bounded while it is read.

A declared ``content-length`` over the limit is refused before a byte is read; a chunked body (or
one that lies about its length) is counted as it arrives and refused the moment it passes the
limit, so a client can never make the router buffer more than ``limit`` bytes. The whole body must
arrive within ``timeout_s`` of the request's head (408 past it): a client that sends its body a
byte at a time, or stops half-way, holds one of the router's request slots that long at most.
"""

from __future__ import annotations

import asyncio

from serve_app.errors import InvalidRequest, PayloadTooLarge, RequestTimeout


async def read_body(request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 19:
            raise InvalidRequest("content-length must be a non-negative integer", param="content-length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came); "
                             "send it whole and retry") from None
    return b"".join(chunks)
