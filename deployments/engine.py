"""The engine deployment: one vLLM ``AsyncLLM`` per replica, served through vLLM's
own OpenAI layer.

We do not re-implement what vLLM already does. The replica builds its
arguments with vLLM's own server argument parser and its serving objects with
vLLM's own ``init_app_state``, so chat templates, tool-call parsers, sampling
parameters and protocol models behave exactly as in ``vllm serve``.

Wire protocol towards the router (a Ray Serve streaming call):
``generate(endpoint, body, request_id)`` yields an ``int`` HTTP status first,
then ``str`` items: for a stream, the SSE events exactly as vLLM produced them
(the router passes the bytes through untouched); otherwise one JSON body.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from deployments.stream_server import (
    DONE_EVENT,
    REGISTER_EVERY_S,
    StreamServer,
    cluster_secret,
    register_gate,
    unregister_gate,
)
from serve_app.config import ModelConfig, SiteConfig, TracingConfig
from serve_app.errors import error_body

logger = logging.getLogger("spillway.engine")

ENDPOINT_CHAT = "chat"
ENDPOINT_COMPLETIONS = "completions"
DONE_PREFIX = DONE_EVENT.decode().rstrip()  # "data: [DONE]", as vLLM ends a stream


@dataclass
class LiveLoad:
    """The replica's latest scheduler view, refreshed by vLLM every engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    updated_at: float = field(default_factory=time.monotonic)


def _load_logger_factory(load: LiveLoad):
    """A vLLM stat-logger factory that copies scheduler stats into ``load``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LiveLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            load.running = scheduler_stats.num_running_reqs
            load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            load.updated_at = time.monotonic()

        def log_engine_initialized(self):
            pass

    return _LiveLoadLogger


def vllm_cli_args(model: ModelConfig, model_path: str, tracing: TracingConfig | None = None) -> list[str]:
    """Translate the typed engine config into ``vllm serve`` command-line arguments."""
    engine = model.engine
    args = [
        "--model", model_path,
        "--served-model-name", model.id,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--dtype", engine.dtype,
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--pipeline-parallel-size", str(engine.pipeline_parallel_size),
        "--seed", str(engine.seed),
    ]
    if engine.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if engine.quantization:
        args += ["--quantization", engine.quantization]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.tool_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", engine.tool_parser]
    if engine.chat_template:
        args += ["--chat-template", engine.chat_template]
    if tracing is not None and tracing.engine_otlp_endpoint:
        # vLLM's request spans join the router's trace through the traceparent it is handed.
        args += ["--otlp-traces-endpoint", tracing.engine_otlp_endpoint]
    return args


def build_vllm_args(model: ModelConfig, model_path: str, tracing: TracingConfig | None = None) -> argparse.Namespace:
    """Parse our arguments with vLLM's own server parser, then apply ``extra_args``.

    Unknown ``extra_args`` keys fail here, when the replica starts (and in
    ``validate_engine_args`` when the app is built), never on a request.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="spillway-engine"))
    namespace = parser.parse_args(vllm_cli_args(model, model_path, tracing))
    known = vars(namespace)
    for key, value in model.engine.extra_args.items():
        attr = key.replace("-", "_")
        if attr not in known:
            raise ValueError(f"model {model.id!r}: engine.extra_args has unknown vLLM argument {key!r}")
        setattr(namespace, attr, value)
    return namespace


def validate_engine_args(model: ModelConfig) -> None:
    """Check ``extra_args`` against vLLM's parser without starting anything."""
    build_vllm_args(model, "placeholder-model")


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
        self._in_flight = 0
        self._aborted = 0
        self._started_at: float | None = None

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
            stat_loggers=[_load_logger_factory(self.load)],
            enable_log_requests=False,
            disable_log_stats=False,
        )
        state = State()
        supported_tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, args, supported_tasks)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._started_at = time.monotonic()
        logger.info("engine for %s ready on site %s (%s)", self.model.id, self.site.name, self.model_path)

    def stats(self) -> dict[str, Any]:
        """Live load for routing: sequences running and waiting, KV-cache use, site, slots."""
        return {
            "model": self.model.id,
            "site": self.site.name,
            "running": self.load.running,
            "waiting": self.load.waiting,
            "in_flight": self._in_flight,
            # Streams closed before their end (client or router gone, or a failure): vLLM aborted them.
            "aborted_streams": self._aborted,
            "kv_cache_usage": self.load.kv_cache_usage,
            "max_num_seqs": self.model.engine.max_num_seqs,
            "stats_age_s": round(time.monotonic() - self.load.updated_at, 3),
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

    async def open(
        self, endpoint: str, body: dict, request_id: str, trace_headers: dict[str, str] | None = None,
    ) -> "Opened":
        """Start one OpenAI request. A complete answer (an error, a non-streamed body) comes back
        whole; a stream comes back as its SSE event iterator, which the caller must consume or
        close (closing aborts the request in vLLM).

        ``trace_headers`` (traceparent/tracestate) reach vLLM as request headers, so its own
        request span becomes a child of the router's generation span."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.exceptions import VLLMClientError

        replica = self.replica_id
        if endpoint == ENDPOINT_CHAT:
            request_cls, create = ChatCompletionRequest, self._chat.create_chat_completion
        elif endpoint == ENDPOINT_COMPLETIONS:
            request_cls, create = CompletionRequest, self._completion.create_completion
        else:
            return Opened(404, replica, _json(error_body(f"unknown endpoint {endpoint!r}", "invalid_request_error", 404)))
        try:
            request = request_cls.model_validate({**body, "request_id": request_id})
        except ValidationError as exc:
            message = _validation_message(exc)
            return Opened(400, replica, _json(error_body(message, "invalid_request_error", 400,
                                                         param=_validation_param(exc))))
        except VLLMClientError as exc:
            # vLLM's own request checks (e.g. stream_options without stream) raise this from a
            # validator: it is the client's error, never the engine's (no failover, no cooldown).
            return Opened(400, replica, _json(error_body(f"invalid request: {exc}", "invalid_request_error", 400,
                                                         param=getattr(exc, "parameter", None))))
        self._in_flight += 1
        streaming = False
        try:
            try:
                result = await create(request, _raw_request(trace_headers))
            except Exception as exc:  # noqa: BLE001 - vLLM raises some request errors instead of returning them
                result = create_error_response(exc)
            if isinstance(result, ErrorResponse):
                error = result.error
                return Opened(error.code, replica,
                              _json(error_body(error.message, error.type, error.code, param=error.param)))
            if hasattr(result, "__anext__"):
                streaming = True
                return Opened(200, replica, events=self._counted(result))
            return Opened(200, replica, result.model_dump_json(exclude_unset=False))
        finally:
            if not streaming:
                self._in_flight -= 1

    def _counted(self, events: AsyncIterator[str]) -> "_CountedStream":
        def left(finished: bool) -> None:
            self._in_flight -= 1
            if not finished:
                self._aborted += 1

        return _CountedStream(events, left)

    async def generate(
        self, endpoint: str, body: dict, request_id: str, trace_headers: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[int, str] | str]:
        """Run one OpenAI request over a Ray streaming call: ``(status, replica_id)``, then the body
        or the SSE events. (The router's fast path is ``open`` plus a direct stream.)"""
        opened = await self.open(endpoint, body, request_id, trace_headers)
        yield opened.status, opened.replica
        if opened.events is None:
            yield opened.body
            return
        events = opened.events
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()


class _CountedStream:
    """A stream's events that leave ``in_flight`` exactly once, however the stream ends: finished,
    failed, or closed (even before its first event, when a parked stream is never claimed).
    ``on_close(finished)`` says whether the stream got to its end (``[DONE]`` or exhausted)."""

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


@dataclass
class Opened:
    """A started request: a complete ``body``, or the ``events`` of a stream."""

    status: int
    replica: str
    body: str | None = None
    events: AsyncIterator[str] | None = None


def _raw_request(trace_headers: dict[str, str] | None):
    """The request object vLLM reads trace headers from (None when there is no trace)."""
    if not trace_headers:
        return None
    from starlette.requests import Request

    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in trace_headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "state": {}})


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


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


class EngineReplica:
    """Ray Serve deployment body for one (model, site). The app builder wraps it with
    ``serve.deployment`` and sets its placement (site resource on every bundle)."""

    async def __init__(self, model: dict, site: dict, model_cache_dir: str | None = None,
                       tracing: dict | None = None):
        from deployments.sources import resolve_model_source

        model_config = ModelConfig.model_validate(model)
        # Resolved here, on the node that runs the replica: builtin models are prepared
        # where they are loaded, and hub ids are downloaded by vLLM on that node.
        model_path = resolve_model_source(model_config.source, model_cache_dir)
        import ray

        from ray import serve

        node_id = ray.get_runtime_context().get_node_id()
        context = serve.get_replica_context()
        replica_id = context.replica_id.unique_id
        self._server = EngineServer(
            model_config, SiteConfig.model_validate(site), model_path, node_id,
            TracingConfig.model_validate(tracing) if tracing else None, replica_id,
        )
        await self._server.start()
        self._drain_timeout_s = model_config.graceful_shutdown_timeout_s
        # KV calls run off the event loop, one at a time and in order: the removal at shutdown
        # then lands after a re-registration that was already under way, never before it.
        self._kv = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spillway-kv")
        self._streams = StreamServer(deployment=context.deployment, handler=self._server.open,
                                     secret=await self._kv_call(cluster_secret))
        await self._streams.start(ray.util.get_node_ip_address())
        # Routers find this replica here and send it requests directly (see stream_server.py).
        gate = (context.app_name, context.deployment, replica_id, self._streams.host, self._streams.port)
        self._gate_key = await self._kv_call(register_gate, *gate)
        self._registrar = asyncio.get_running_loop().create_task(self._keep_registered(gate))

    def _kv_call(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._kv, fn, *args)

    async def _keep_registered(self, gate: tuple) -> None:
        while True:  # until __del__ cancels it
            await asyncio.sleep(REGISTER_EVERY_S)
            try:
                await self._kv_call(register_gate, *gate)
            except Exception as exc:  # noqa: BLE001 - try again next time; routers keep what they know
                logger.warning("could not list this replica for direct requests: %r", exc)

    async def open(self, endpoint: str, body: dict, request_id: str, trace_headers: dict | None = None):
        """Serve streaming call with one item, the reply: a complete answer, or the address of a
        parked stream the router reads over a direct connection (deployments/stream_server.py).
        For a stream the call then stays open until the stream is over, so Serve counts it as
        an ongoing request (replica choice, max_ongoing_requests, graceful drain)."""
        opened = await self._server.open(endpoint, body, request_id, trace_headers)
        reply = {"status": opened.status, "replica": opened.replica}
        if opened.events is None:
            reply["body"] = opened.body
            yield reply
            return
        over = asyncio.Event()
        token = self._streams.park(opened.events, over.set)
        reply.update(host=self._streams.host, port=self._streams.port, token=token)
        try:
            yield reply
            await over.wait()
        finally:
            # Cancelled before the router claimed the stream (it could not connect, or went away).
            await self._streams.discard(token)

    async def generate(self, endpoint: str, body: dict, request_id: str, trace_headers: dict | None = None):
        async for item in self._server.generate(endpoint, body, request_id, trace_headers):
            yield item

    async def stats(self) -> dict[str, Any]:
        return self._server.stats()

    def record_routing_stats(self) -> dict[str, Any]:
        # Ray Serve polls this and hands the dict to request routers.
        return self._server.stats()

    async def check_health(self) -> None:
        await self._server.check_health()

    async def __del__(self):
        # Serve has drained the requests it carried (a parked stream's `open` call stays open until
        # the stream is over). Direct requests are this replica's to drain: leave the routers'
        # list, answer new ones "retry" (routers then go through Serve, which routes elsewhere),
        # and let the running ones finish, within the graceful shutdown time.
        try:
            self._registrar.cancel()
            await self._kv_call(unregister_gate, self._gate_key)
            self._kv.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - the GCS may be gone at teardown
            pass
        try:
            if not await self._streams.drain(self._drain_timeout_s):
                logger.warning("%d direct requests were still running at shutdown", self._streams.direct_active)
            self._server.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown; nothing left to report to
            pass


def engine_env(model: ModelConfig, site: SiteConfig | None = None, tracing: TracingConfig | None = None) -> dict[str, str]:
    """Environment for engine replicas: safe CPU defaults, the model's ``env``, then the site's ``engine_env``."""
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if tracing is not None and tracing.engine_otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = tracing.engine_otlp_protocol
        env["OTEL_SERVICE_NAME"] = f"{tracing.service_name}-engine"
    env.update(model.env)
    if site is not None:
        env.update(site.engine_env)
    return env


__all__ = [
    "ENDPOINT_CHAT",
    "ENDPOINT_COMPLETIONS",
    "EngineReplica",
    "EngineServer",
    "LiveLoad",
    "build_vllm_args",
    "engine_env",
    "validate_engine_args",
    "vllm_cli_args",
]
