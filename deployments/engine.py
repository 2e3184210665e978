"""The engine: one vLLM ``AsyncLLM`` served through vLLM's own OpenAI layer, without Ray.

We do not re-implement what vLLM already does. The server builds its arguments with vLLM's own
server argument parser and its serving objects with vLLM's own ``init_app_state``, so chat
templates, tool-call parsers, sampling parameters and protocol models behave exactly as in
``vllm serve``. ``deployments/replica.py`` wraps it as a Ray Serve deployment.

``EngineServer.open`` starts one OpenAI request and returns an ``Opened``:
- ``body``: a complete answer (a validation error, or an error vLLM returned at once);
- ``events``: a stream's SSE events, exactly as vLLM writes them (the router passes the bytes
  through untouched); the caller must consume or close them (closing aborts the request in vLLM);
- ``pending``: a non-streamed request vLLM has accepted; the task gives ``(status, body,
  engine_dead)`` when generation ends, and cancelling it aborts the request.

A 5xx that comes from a dead engine says so (``engine_dead``), so the router fails over and
holds this replica out; any other answer is the request's own and never touches engine health.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from deployments.live_load import LiveLoad, live_load_logger
from deployments.vllm_args import build_vllm_args
from serve_app.config import ModelConfig, SiteConfig, TracingConfig
from serve_app.errors import error_body
from serve_app.pipeline.schema import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS, sequences_of

logger = logging.getLogger("spillway.engine")

DONE_PREFIX = "data: [DONE]"


@dataclass
class Opened:
    """A started request: a complete ``body``, the ``events`` of a stream, or a ``pending`` result."""

    status: int
    replica: str
    body: bytes | None = None
    events: AsyncIterator[str] | None = None
    pending: "asyncio.Future[tuple[int, bytes, bool]] | None" = None
    full: bool = False  # refused: it would take the engine past max_num_seqs sequences


class EngineServer:
    """vLLM's engine and OpenAI serving objects, without Ray (usable and testable alone)."""

    def __init__(self, model: ModelConfig, site: SiteConfig, model_path: str, node_id: str | None = None,
                 tracing: TracingConfig | None = None, replica_id: str | None = None):
        self.model = model
        self.tracing = tracing
        self.replica_id = replica_id or f"{model.id}@{site.name}"
        self.node_id = node_id
        self.site = site
        self.model_path = model_path
        self.load = LiveLoad()
        self._engine = None
        self._chat = None
        self._completion = None
        self._embedding = None
        self._in_flight = 0
        self._sequences = 0
        self._aborted = 0
        self._refused_full = 0
        # Bumped whenever sequences free up; routers wait on it (``released_since``) to hear of
        # other routers' releases at once instead of at their next poll.
        self.releases = 0
        self._released: asyncio.Future | None = None

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = build_vllm_args(self.model, self.model_path, self.tracing)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        self._engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[live_load_logger(self.load)],
            enable_log_requests=False,
            disable_log_stats=False,
        )
        state = State()
        supported_tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, args, supported_tasks)
        self._chat = getattr(state, "openai_serving_chat", None)  # (none on a pooling model)
        self._completion = getattr(state, "openai_serving_completion", None)
        self._embedding = getattr(state, "serving_embedding", None)
        logger.info("engine for %s ready on site %s (%s)", self.model.id, self.site.name, self.model_path)

    @property
    def engine_dead(self) -> bool:
        return self._engine is None or bool(self._engine.errored)

    def stats(self) -> dict[str, Any]:
        """Live load for routing: sequences running and waiting, step times, KV-cache use, slots."""
        return {
            "model": self.model.id,
            "site": self.site.name,
            "replica": self.replica_id,
            "running": self.load.running,
            "waiting": self.load.waiting,
            "in_flight": self._in_flight,
            "sequences": self._sequences,
            # Streams closed before their end (client or router gone, or a failure): vLLM aborted them.
            "aborted_streams": self._aborted,
            "refused_full": self._refused_full,
            "releases": self.releases,
            "kv_cache_usage": self.load.kv_cache_usage,
            "itl_ms": self.load.itl_ms,
            "ttft_ms": self.load.ttft_ms,
            "max_num_seqs": self.model.engine.max_num_seqs,
            "stats_age_s": round(time.monotonic() - self.load.updated_at, 3),
            "engine_dead": self.engine_dead,
            "node_id": self.node_id,
        }

    async def check_health(self) -> None:
        if self._engine is None:
            raise RuntimeError("engine not started")
        await self._engine.check_health()

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def open(self, endpoint: str, body: bytes, request_id: str, trace_headers: dict[str, str] | None = None,
                   admit_sequences: int | None = None) -> Opened:
        """Start one OpenAI request (see the module docstring for what comes back).

        ``trace_headers`` (traceparent/tracestate) reach vLLM as request headers, so its own
        request span becomes a child of the router's generation span. With ``admit_sequences``
        (a router's direct request) a request that would take the engine past ``max_num_seqs``
        sequences is refused (``full``) instead of queued inside vLLM."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest
        from vllm.exceptions import VLLMClientError

        if endpoint == ENDPOINT_CHAT and self._chat is not None:
            request_cls, create = ChatCompletionRequest, self._chat.create_chat_completion
        elif endpoint == ENDPOINT_COMPLETIONS and self._completion is not None:
            request_cls, create = CompletionRequest, self._completion.create_completion
        elif endpoint == ENDPOINT_EMBEDDINGS and self._embedding is not None:
            request_cls, create = EmbeddingCompletionRequest, self._embed
        else:
            return self._error(404, f"unknown endpoint {endpoint!r}")
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(400, "request body is not a JSON object")
        try:
            request = request_cls.model_validate({**fields, "request_id": request_id})
        except ValidationError as exc:
            return self._error(400, _validation_message(exc), _validation_param(exc))
        except VLLMClientError as exc:
            # vLLM's own request checks (e.g. stream_options without stream) raise this from a
            # validator: the client's error, never the engine's (no failover, no cooldown).
            return self._error(400, f"invalid request: {exc}", getattr(exc, "parameter", None))
        sequences = sequences_of(endpoint, fields, self.model.engine.max_num_seqs)
        if admit_sequences is not None and self._sequences + sequences > self.model.engine.max_num_seqs:
            self._refused_full += 1
            return Opened(503, self.replica_id, full=True)  # no await since the count: exact on this loop
        self._enter(sequences)
        if not getattr(request, "stream", False):
            pending = asyncio.ensure_future(self._complete(create, request, trace_headers))
            pending.add_done_callback(lambda _: self._leave(sequences))
            return Opened(200, self.replica_id, pending=pending)
        try:
            result = await self._create(create, request, trace_headers)
        except BaseException:
            self._leave(sequences)
            raise
        if not hasattr(result, "__anext__"):
            self._leave(sequences)
            status, answer, _ = self._answer(result)
            return Opened(status, self.replica_id, body=answer)
        return Opened(200, self.replica_id, events=_CountedStream(result, lambda finished: self._leave(
            sequences, aborted=not finished)))

    def _enter(self, sequences: int) -> None:
        self._in_flight += 1
        self._sequences += sequences

    def _leave(self, sequences: int, aborted: bool = False) -> None:
        self._in_flight -= 1
        self._sequences -= sequences
        self._aborted += int(aborted)
        self.releases += 1
        if self._released is not None and not self._released.done():
            self._released.set_result(None)
        self._released = None

    async def released_since(self, after: int, wait_s: float) -> None:
        """Return once sequences were released since the ``releases`` count ``after``, or after
        ``wait_s`` (on the event loop that runs requests; waiters share one future)."""
        if self.releases != after or wait_s <= 0:
            return
        if self._released is None:
            self._released = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.shield(self._released)
        except TimeoutError:
            pass

    async def _create(self, create, request, trace_headers):
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            return await create(request, _raw_request(trace_headers))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - vLLM raises some request errors instead of returning them
            return create_error_response(exc)

    async def _embed(self, request, raw_request):
        """vLLM's embedding serving answers a Starlette response and raises its request errors."""
        response = await self._embedding(request, raw_request)
        return _Answered(response.status_code, bytes(response.body))

    async def _complete(self, create, request, trace_headers) -> tuple[int, bytes, bool]:
        return self._answer(await self._create(create, request, trace_headers))

    def _answer(self, result) -> tuple[int, bytes, bool]:
        """``(status, body, engine_dead)`` of a non-streamed result."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(result, _Answered):
            return result.status, result.body, False
        if isinstance(result, ErrorResponse):
            error = result.error
            # OpenAI's type for a client error (vLLM names its exception class there)
            kind = "invalid_request_error" if 400 <= error.code < 500 else error.type
            body = _json(error_body(error.message, kind, error.code, param=error.param))
            return error.code, body, error.code >= 500 and self.engine_dead
        return 200, result.model_dump_json(exclude_unset=False).encode(), False

    def _error(self, status: int, message: str, param: str | None = None) -> Opened:
        return Opened(status, self.replica_id, body=_json(error_body(message, "invalid_request_error", status,
                                                                      param=param)))

    async def generate(self, endpoint: str, body: bytes, request_id: str,
                       trace_headers: dict[str, str] | None = None) -> AsyncIterator[tuple[int, str] | str]:
        """One OpenAI request as a Ray streaming call: ``(status, replica_id)``, then the body or the
        SSE events, each a Ray object (the routing benchmark's Ray Serve-style baseline)."""
        opened = await self.open(endpoint, body, request_id, trace_headers)
        if opened.pending is not None:
            status, answer, _ = await opened.pending
            yield status, opened.replica
            yield answer.decode()
            return
        yield opened.status, opened.replica
        if opened.events is None:
            yield opened.body.decode()
            return
        events = opened.events
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()


@dataclass(frozen=True)
class _Answered:
    """A complete answer vLLM already encoded (its pooling endpoints answer responses)."""

    status: int
    body: bytes


class _CountedStream:
    """A stream's events that call ``on_close(finished)`` exactly once, however the stream ends:
    finished, failed, or closed (even before its first event, when a parked stream is never
    claimed). ``finished`` says whether it got to its end (``[DONE]`` or exhausted)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[bool], None]):
        self._events = events
        self._on_close = on_close
        self._closed = False
        self._finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            self._finished = True
            await self.aclose()
            raise
        except BaseException:
            await self.aclose()
            raise
        if event.startswith(DONE_PREFIX):
            self._finished = True
        return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close(self._finished)
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


def _raw_request(trace_headers: dict[str, str] | None):
    """The request object vLLM reads trace headers from (None when there is no trace)."""
    if not trace_headers:
        return None
    from starlette.requests import Request

    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in trace_headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "state": {}})


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _validation_param(exc) -> str | None:
    errors = exc.errors()
    if errors and errors[0].get("loc"):
        return ".".join(str(p) for p in errors[0]["loc"] if p != "body")
    return None


def _validation_message(exc) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)
