"""The engine port's wire format, shared by the engine replica (server) and the router (client).

Every frame a router sends starts with a fixed 44-byte header, checked before a single byte of the
payload is read:

    magic "SPW1" | kind (1 byte) | 3 zero bytes | payload length (uint32, big endian) | secret (32 bytes)

- ``kind``: ``R`` a request (payload: a JSON line of routing facts, then the OpenAI body),
  ``C`` the claim of a parked stream (payload: its token), ``S`` a load report (no payload);
- the secret is the Ray cluster's (``deployments/discovery.py``), compared in constant time on
  two byte strings of the same length, which never raises;
- the length is checked against the port's ``max_frame_bytes`` before anything is read, so a peer
  without the secret, or one that declares a huge frame, costs the engine 44 bytes.

Answers are JSON header lines, then ``length`` bytes of body, or a stream's SSE bytes up to
``data: [DONE]``. A non-streamed request is first answered ``{"accepted": true}`` once the engine
has validated it; the result follows when generation ends.
"""

from __future__ import annotations

import hmac
import json
import struct

MAGIC = b"SPW1"
KIND_REQUEST = b"R"
KIND_CLAIM = b"C"
KIND_STATS = b"S"
KINDS = frozenset({KIND_REQUEST, KIND_CLAIM, KIND_STATS})
SECRET_BYTES = 32
HEADER = struct.Struct("!4sc3xI32s")
RETRY_ELSEWHERE = b'{"status":503,"retry":true}\n'
ACCEPTED = b'{"accepted":true}\n'


class WireError(Exception):
    """A frame the port refuses; the connection is closed."""


def pack(kind: bytes, secret: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, len(payload), secret) + payload


def unpack(header: bytes, secret: bytes, max_frame_bytes: int) -> tuple[bytes, int]:
    """``(kind, payload length)`` of a checked header; raises ``WireError``."""
    magic, kind, length, presented = HEADER.unpack(header)
    if magic != MAGIC or kind not in KINDS:
        raise WireError("not a Spillway frame")
    if not hmac.compare_digest(presented, secret):
        raise WireError("wrong secret")
    if length > max_frame_bytes:
        raise WireError(f"frame of {length} bytes is over the limit of {max_frame_bytes}")
    return kind, length


def request_payload(meta: dict, body: bytes) -> bytes:
    """A request frame's payload: the routing facts as one JSON line, then the body as it is."""
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + body


def split_request(payload: bytes) -> tuple[dict, bytes]:
    line, _, body = payload.partition(b"\n")
    meta = json.loads(line)
    if not isinstance(meta, dict):
        raise ValueError("request meta must be an object")
    return meta, body


def header_line(**fields) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def secret_bytes(secret: str) -> bytes:
    """The cluster secret (hex, as kept in Ray's KV store) as the 32 bytes frames carry."""
    raw = bytes.fromhex(secret)
    if len(raw) != SECRET_BYTES:
        raise ValueError("the cluster secret must be 32 bytes")
    return raw
