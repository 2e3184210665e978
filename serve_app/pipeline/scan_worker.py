"""The scan helper process: ``python -m serve_app.pipeline.scan_worker``.

Reads length-prefixed msgpack frames on stdin and answers each on stdout, in order:
- the first frame is the ``ScanSpec``;
- every further frame is ``[endpoint, body]``, answered with the ``ScanResult``.

It imports neither Ray nor the router: only the scan and its detectors. A crash here costs the
router one retry on a fresh helper, never its event loop.
"""

from __future__ import annotations

import struct
import sys

import msgspec

from serve_app.pipeline.scan import result_to_wire, scan_request, spec_from_wire

LENGTH = struct.Struct("!I")


def _read(stream) -> bytes | None:
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    first = _read(stdin)
    if first is None:
        return 1
    spec = spec_from_wire(decoder.decode(first))
    while True:
        frame = _read(stdin)
        if frame is None:
            return 0
        endpoint, body = decoder.decode(frame)
        answer = encoder.encode(result_to_wire(scan_request(bytes(body), str(endpoint), spec)))
        stdout.write(LENGTH.pack(len(answer)) + answer)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
