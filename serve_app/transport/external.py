"""The external transport: an OpenAI-compatible API elsewhere, over HTTP (aiohttp).

A site of kind ``external`` (``config/sites.py``) is a third way to reach "an engine", behind the
same interface as the direct and Serve-call transports: ``send`` answers an ``EngineReply`` (a
complete body, or a stream whose first event the dispatch stage reads before the client sees
anything) or raises ``TransportError`` when nothing reached the client.

- The request's ``model`` becomes the API's name for it (``external.models``); nothing else in the
  body changes, so streaming, tools, JSON mode and ``stream_options`` pass through.
- Before the first byte, a failure is retried here ``external.retries`` times with backoff: no
  connection, no response headers within ``first_byte_timeout_s``, or a 429 / 5xx. Once retries
  are spent it is a ``TransportError``: the dispatch stage may fail over to another site, and
  holds this one out for ``replica_cooldown_s`` (a circuit breaker). Any other answer (a 400, a 404)
  is the request's own and is passed on as it came.
- A stream that breaks midway ends, in the relay, with an explicit error event, never silently.
- The key is read from the environment (``external.api_key_env``) when the router starts.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec

from serve_app.config import SiteConfig
from serve_app.pipeline.schema import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS
from serve_app.transport.base import EngineReply, EngineRequest, EngineStream, TransportError

logger = logging.getLogger("spillway.transport.external")

PATHS = {ENDPOINT_CHAT: "/chat/completions", ENDPOINT_COMPLETIONS: "/completions", ENDPOINT_EMBEDDINGS: "/embeddings"}
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


class _StreamReader:
    """aiohttp's payload as the relay reads it: ``read(n)`` gives b"" at the end, and a broken
    payload is a ``ConnectionError`` (what the relay treats as a stream that broke)."""

    def __init__(self, response):
        self._response = response

    async def read(self, n: int) -> bytes:
        import aiohttp

        try:
            return await self._response.content.read(n)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ConnectionError(f"external stream broke: {exc!r}") from exc


class ExternalTransport:
    """One external site. ``replica`` names it in headers and logs (``external:<site>``)."""

    def __init__(self, site: SiteConfig):
        self.site = site
        self.endpoint = site.external
        self.replica = f"external:{site.name}"
        self._api_key = os.environ.get(self.endpoint.api_key_env) if self.endpoint.api_key_env else None
        if self.endpoint.api_key_env and not self._api_key:
            logger.warning("external site %s: %s is not set; requests go without a key", site.name,
                           self.endpoint.api_key_env)
        self._session = None
        self.failures = 0  # requests that failed before their first byte, retries spent

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.endpoint.connect_timeout_s),
                auto_decompress=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def remote_body(self, request: EngineRequest, model: str) -> bytes:
        """The body with the API's model name (the router's body always names the Spillway id)."""
        body = _DECODER.decode(request.body)
        body["model"] = self.endpoint.models.get(model, model)
        return _ENCODER.encode(body)

    async def send(self, request: EngineRequest, model: str) -> EngineReply:
        import aiohttp

        url = self.endpoint.base_url + PATHS[request.endpoint]
        headers = {"content-type": "application/json", "x-request-id": request.request_id,
                   **(request.trace_headers or {})}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        body = self.remote_body(request, model)
        wait_s = self.endpoint.first_byte_timeout_s if request.stream else self.endpoint.request_timeout_s
        last = "no attempt"
        for attempt in range(self.endpoint.retries + 1):
            if attempt:
                await asyncio.sleep(self.endpoint.retry_backoff_s * 2 ** (attempt - 1))
            response = None
            try:
                async with asyncio.timeout(wait_s):
                    response = await self._client().post(url, data=body, headers=headers)
                    if response.status in RETRY_STATUSES:
                        detail = (await response.content.read(512)).decode("utf-8", "replace")
                        response.close()
                        last = f"HTTP {response.status}: {detail[:200]}"
                        continue
                    if request.stream and response.status == 200:
                        return EngineReply(200, self.replica, stream=EngineStream(
                            _StreamReader(response), None, self.replica, release=self._releaser(response)))
                    answer = await _read_bounded(response, self.endpoint.max_response_bytes + 1)
                    response.close()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if response is not None:
                    response.close()
                last = f"{type(exc).__name__}: {exc}"[:300]
                continue
            except BaseException:
                if response is not None:
                    response.close()
                raise
            if len(answer) > self.endpoint.max_response_bytes:
                raise TransportError(f"{self.replica}: the answer is larger than max_response_bytes", self.replica)
            return EngineReply(response.status, self.replica, body=answer)
        self.failures += 1
        raise TransportError(f"{self.replica} failed after {self.endpoint.retries + 1} attempts: {last}", self.replica)

    @staticmethod
    def _releaser(response):
        def release(reusable: bool) -> None:
            # A stream read to its end leaves the connection reusable; otherwise closing it is what
            # tells the API to stop generating.
            if reusable:
                response.release()
            else:
                response.close()
        return release


async def _read_bounded(response, limit: int) -> bytes:
    """The body, but never more than ``limit`` bytes of it."""
    chunks, size = [], 0
    while size < limit:
        chunk = await response.content.read(min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
