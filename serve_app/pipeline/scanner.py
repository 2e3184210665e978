"""Where a body's scan runs: on the event loop when it is small, in a helper process when not.

Parsing and matching are C code that holds the GIL, so a thread would not help: a hostile 1 MiB
body (a third of a million empty objects, say) takes tens of milliseconds to parse, and every
other request on this router would wait that long. Bodies up to ``inline_max_bytes`` (16 KiB by
default: at most a couple of milliseconds, whatever their content) are scanned inline; larger
ones go to one of ``workers`` helper processes (``scan_worker.py``) over pipes, msgpack both
ways. The loop then only copies the bytes.

A helper that dies is replaced and the scan tried once more; a second failure is a 503, never a
request that skipped its scan.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys

import msgspec

from serve_app.errors import EngineUnavailable
from serve_app.pipeline.scan import ScanResult, ScanSpec, result_from_wire, scan_request, spec_to_wire

logger = logging.getLogger("spillway.scan")

LENGTH = struct.Struct("!I")
RETRY_AFTER_S = 1.0


class ScanUnavailable(EngineUnavailable):
    code = "scan_unavailable"


class _Helper:
    """One helper process; scans run one at a time, in order."""

    def __init__(self, spec_frame: bytes):
        self._spec_frame = spec_frame
        self._proc: asyncio.subprocess.Process | None = None
        self._killed: list[asyncio.subprocess.Process] = []  # reaped at close
        self._lock = asyncio.Lock()
        self.waiting = 0

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is not None:
            self.kill()  # it died on its own: reaped at close like a killed one
        if self._proc is None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "serve_app.pipeline.scan_worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 16)
            self._proc.stdin.write(LENGTH.pack(len(self._spec_frame)) + self._spec_frame)
        return self._proc

    async def scan(self, frame: bytes) -> bytes:
        self.waiting += 1
        try:
            async with self._lock:
                proc = await self._ensure()
                try:
                    proc.stdin.write(LENGTH.pack(len(frame)) + frame)
                    await proc.stdin.drain()
                    (size,) = LENGTH.unpack(await proc.stdout.readexactly(LENGTH.size))
                    return await proc.stdout.readexactly(size)
                except BaseException:
                    self.kill()  # a half-read answer leaves the pipe out of step: start afresh
                    raise
        finally:
            self.waiting -= 1

    def kill(self) -> None:
        if self._proc is not None:
            if self._proc.returncode is None:
                self._proc.kill()
            self._killed.append(self._proc)
        self._proc = None

    async def aclose(self) -> None:
        async with self._lock:  # after a scan or a start under way (the warm-up) has settled
            self.kill()
            killed, self._killed = self._killed, []
            await asyncio.gather(*(proc.wait() for proc in killed))


class Scanner:
    def __init__(self, spec: ScanSpec, inline_max_bytes: int, workers: int = 1):
        self.spec = spec
        self.inline_max_bytes = inline_max_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder()
        spec_frame = self._encoder.encode(spec_to_wire(spec))
        self._helpers = [_Helper(spec_frame) for _ in range(workers)]
        self.offloaded = 0

    async def scan(self, raw: bytes, endpoint: str) -> ScanResult:
        if len(raw) <= self.inline_max_bytes:
            return scan_request(raw, endpoint, self.spec)
        self.offloaded += 1
        frame = self._encoder.encode([endpoint, raw])
        helper = min(self._helpers, key=lambda h: h.waiting)
        for attempt in (1, 2):
            try:
                return result_from_wire(self._decoder.decode(await helper.scan(frame)))
            except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
                logger.warning("scan helper failed (attempt %d): %r", attempt, exc)
        raise ScanUnavailable("the request could not be scanned; retry later", retry_after_s=RETRY_AFTER_S)

    async def warm(self) -> None:
        """Start the helpers before the first large body needs them."""
        probe = self._encoder.encode(["chat", b'{"model":"warm","messages":[{"role":"user","content":"x"}]}'])
        await asyncio.gather(*(h.scan(probe) for h in self._helpers), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(helper.aclose() for helper in self._helpers))
