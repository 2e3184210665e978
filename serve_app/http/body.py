"""Reading a request body, bounded while it is read.

A declared ``content-length`` over the limit is refused before a byte is read; a chunked body (or
one that lies about its length) is counted as it arrives and refused the moment it passes the
limit, so a client can never make the router buffer more than ``limit`` bytes.
"""

from __future__ import annotations

from serve_app.errors import InvalidRequest, PayloadTooLarge


async def read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 19:
            raise InvalidRequest("content-length must be a non-negative integer", param="content-length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
