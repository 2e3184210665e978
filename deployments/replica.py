"""The engine deployment: one ``EngineServer`` per Ray Serve replica, plus its direct port.

The app builder wraps ``EngineReplica`` with ``serve.deployment`` and sets its placement (the
site's resource on every bundle). Routers reach a replica two ways:
- directly, over its port (``deployments/stream_server.py``): the replica lists its address in
  Ray's KV store (``deployments/discovery.py``) and re-lists it every few seconds;
- through one Serve call (``open``), the fallback for a replica a router does not know yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deployments.discovery import REGISTER_EVERY_S, cluster_secret, register_gate, unregister_gate
from deployments.engine import EngineServer
from deployments.stream_server import PortLimits, StreamServer
from deployments.wire import secret_bytes
from serve_app.config import EnginePortConfig, ModelConfig, SiteConfig, TracingConfig

logger = logging.getLogger("spillway.engine")


class EngineReplica:
    """Ray Serve deployment body for one (model, site)."""

    async def __init__(self, model: dict, site: dict, model_cache_dir: str | None = None,
                       tracing: dict | None = None, engine_port: dict | None = None):
        from deployments.sources import resolve_model_source

        # When each start-up step ended (wall clock): the cold-start breakdown of a new replica.
        self._startup = {"process_started_at": _process_started_at(), "init_at": time.time()}
        model_config = ModelConfig.model_validate(model)
        # Resolved here, on the node that runs the replica: builtin models are prepared
        # where they are loaded, and hub ids are downloaded by vLLM on that node.
        model_path = await asyncio.to_thread(resolve_model_source, model_config.source, model_cache_dir)
        import ray
        from ray import serve

        self._startup["source_ready_at"] = time.time()
        node_id = ray.get_runtime_context().get_node_id()
        context = serve.get_replica_context()
        replica_id = context.replica_id.unique_id
        self._server = EngineServer(
            model_config, SiteConfig.model_validate(site), model_path, node_id,
            TracingConfig.model_validate(tracing) if tracing else None, replica_id,
        )
        await self._server.start()
        self._startup["engine_ready_at"] = time.time()
        self._drain_timeout_s = model_config.graceful_shutdown_timeout_s
        # KV calls run off the event loop, one at a time and in order: the removal at shutdown
        # then lands after a re-registration that was already under way, never before it.
        self._kv = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spillway-kv")
        port = EnginePortConfig.model_validate(engine_port or {})
        self._port = StreamServer(
            secret_bytes(await self._kv_call(cluster_secret)),
            PortLimits(port.max_frame_bytes, port.max_connections, port.idle_timeout_s, port.read_timeout_s),
            deployment=context.deployment, handler=self._server.open, stats=self.report,
            engine_dead=lambda: self._server.engine_dead, wait_release=self._server.released_since,
        )
        await self._port.start(ray.util.get_node_ip_address(), local_socket=True)
        gate = (context.app_name, context.deployment, replica_id, self._port.host, self._port.port)
        self._gate_key = await self._kv_call(register_gate, *gate)
        self._startup["registered_at"] = time.time()
        self._registrar = asyncio.get_running_loop().create_task(self._keep_registered(gate))
        logger.info("engine replica %s listens on %s:%d%s (pid %d)", replica_id, self._port.host, self._port.port,
                    f" and {self._port.local_socket}" if self._port.local_socket else "", os.getpid())

    def _kv_call(self, fn, *args) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._kv, fn, *args)

    async def _keep_registered(self, gate: tuple) -> None:
        while True:  # until __del__ cancels it
            await asyncio.sleep(REGISTER_EVERY_S)
            try:
                await self._kv_call(register_gate, *gate)
            except Exception as exc:  # noqa: BLE001 - try again next time; routers keep what they know
                logger.warning("could not list this replica for direct requests: %r", exc)

    def report(self) -> dict[str, Any]:
        port = {"connections": self._port.connections, "refused": dict(self._port.refused)}
        return {**self._server.stats(), "port": port, "startup": self._startup}

    async def open(self, endpoint: str, body: bytes, request_id: str, trace_headers: dict | None = None):
        # (Serve's own max_ongoing_requests bounds this path: no "full" refusal here.)
        """The Serve-call fallback, a streaming call. A non-streamed request yields ``{"accepted"}``,
        then ``{"status", "body", "engine_dead"}``; cancelling the call aborts it. A stream yields
        the address of the parked stream, which the router claims on the port; the call then
        stays open until the stream is over, so Serve counts it (replica choice, drain)."""
        opened = await self._server.open(endpoint, body, request_id, trace_headers)
        reply: dict[str, Any] = {"status": opened.status, "replica": opened.replica}
        if opened.pending is not None:
            try:
                yield {"accepted": True, "replica": opened.replica}
                status, answer, engine_dead = await opened.pending
            finally:
                opened.pending.cancel()
            yield {**reply, "status": status, "body": answer, "engine_dead": engine_dead}
            return
        if opened.events is None:
            yield {**reply, "body": opened.body}
            return
        over = asyncio.Event()
        token = self._port.park(opened.events, over.set)
        reply.update(host=self._port.host, port=self._port.port, token=token)
        try:
            yield reply
            await over.wait()
        finally:
            # Cancelled before the router claimed the stream (it could not connect, or went away).
            await self._port.discard(token)

    async def generate(self, endpoint: str, body: bytes, request_id: str, trace_headers: dict | None = None):
        async for item in self._server.generate(endpoint, body, request_id, trace_headers):
            yield item

    async def stats(self) -> dict[str, Any]:
        return self.report()

    def record_routing_stats(self) -> dict[str, Any]:
        # Ray Serve polls this and hands the dict to request routers.
        return self._server.stats()

    async def check_health(self) -> None:
        await self._server.check_health()

    async def __del__(self):
        # Serve has drained the requests it carried (a parked stream's `open` call stays open until
        # the stream is over). Direct requests are this replica's to drain: leave the routers'
        # list, answer new ones "retry" (routers then go elsewhere), and let the running ones
        # finish, within the graceful shutdown time.
        try:
            self._registrar.cancel()
            await self._kv_call(unregister_gate, self._gate_key)
            self._kv.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - the GCS may be gone at teardown
            pass
        try:
            if not await self._port.drain(self._drain_timeout_s):
                logger.warning("%d direct requests were still running at shutdown", self._port.direct_active)
            await self._port.close()
            self._server.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown; nothing left to report to
            pass


def _process_started_at() -> float | None:
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - a report field, never worth failing a replica
        return None


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
