"""The response cache: exact matches of deterministic requests, per tenant, bounded in entries,
bytes and age, in the router replica's memory (LRU).

The key is the SHA-256 of the tenant, the endpoint, the model that serves the request and the
request body as the router forwards it (``scan.rest``: everything but ``model`` and
``stream_options``), so two tenants never share an entry, and a streamed request hits only
streamed answers (served again as a stream) and a non-streamed one only non-streamed answers.
An answer is kept as the engine sent it. What may be stored is decided by the cache stage
(``pipeline/cache.py``): only answers whose data class the router's site may hold.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass


def cache_key(tenant: str, endpoint: str, model: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (tenant.encode(), endpoint.encode(), model.encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(body)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    body: bytes
    stream: bool
    stored_at: float


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int, max_age_s: float, clock=time.monotonic):
        self.max_entries, self.max_bytes, self.max_age_s = max_entries, max_bytes, max_age_s
        self.clock = clock
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.stored = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is not None and self.clock() - entry.stored_at > self.max_age_s:
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, body: bytes, stream: bool) -> bool:
        if len(body) > self.max_bytes // 4:  # one answer never takes over the cache
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = CachedAnswer(body, stream, self.clock())
        self.bytes += len(body)
        self.stored += 1
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.body)

    def report(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "stored": self.stored}
