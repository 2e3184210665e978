"""A real vLLM OpenAI server (vLLM's ``api_server``, what ``vllm serve`` runs) on loopback, standing in for an external API site,
and a TCP proxy in front of it that records what passes and can cut a response short."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path  # noqa: F401 - (log paths)

import httpx

READY_TIMEOUT_S = 240


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    def __init__(self, model_path: str, name: str, port: int, log_path: Path):
        self.model_path, self.name, self.port, self.log_path = model_path, name, port, log_path
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VllmServer":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                   "--served-model-name", self.name,
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048", "--max-num-seqs", "8",
                   "--dtype", "bfloat16", "--enforce-eager", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def wait_ready(self) -> "VllmServer":
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve was not ready in {READY_TIMEOUT_S}s; see {self.log_path}")

    def kill(self) -> None:
        """Dies as a crashed server does: no goodbye on open connections."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class TcpProxy:
    """Forwards loopback connections to ``upstream_port``; keeps every request's bytes (to show what
    reached the upstream) and, with ``cut_after_bytes`` set, closes a response after that many."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.requests: list[bytes] = []
        self.cut_after_bytes: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def seen(self, needle: bytes) -> bool:
        return any(needle in request for request in list(self.requests))

    def start(self) -> "TcpProxy":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        index = len(self.requests)
        self.requests.append(b"")
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def upstream() -> None:
            while chunk := await reader.read(1 << 16):
                self.requests[index] += chunk
                up_writer.write(chunk)
                await up_writer.drain()

        async def downstream() -> None:
            sent = 0
            while chunk := await up_reader.read(1 << 16):
                limit = self.cut_after_bytes
                if limit is not None and sent + len(chunk) > limit:
                    writer.write(chunk[:max(0, limit - sent)])
                    await writer.drain()
                    writer.transport.abort()  # a broken connection, not a clean end
                    return
                sent += len(chunk)
                writer.write(chunk)
                await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(tasks, timeout=0.5)  # the request side may still be closing
        except Exception:  # noqa: BLE001 - a test proxy: any failure just ends the connection
            pass
        finally:
            for task in tasks:
                task.cancel()
            up_writer.close()
            writer.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)
