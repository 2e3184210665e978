"""``spillway demo cloud-burst``: cloud capacity from zero, the whole chain, on one machine.

1. Starts a Ray head (the on-prem site) with Ray's fake multi-node provider
   (``cluster_configs/ray/fake-multinode.yaml``): Ray's autoscaler adds "cloud nodes" as extra Ray
   nodes on this machine when work waits for ``site:cloud``, and removes them when idle.
2. Deploys ``cluster_configs/serve/fake-cloud.yaml`` with Serve's own ``serve deploy`` (its Spillway
   config, ``cluster_configs/fake-cloud.yaml``: dense on-prem, fixed; dense in the cloud, 0..1).
3. Bursts: streaming requests, more than on-prem's slots, until a cloud replica has served several.
   The router queues them on-prem, reports the spill pressure, the cloud scaler asks Serve for a
   cloud replica, the replica waits for a node, Ray's autoscaler starts one, the engine loads and
   registers, and the router spills to it.
4. Stops the burst and waits until the cloud replica and then the cloud node are gone.

It prints cloud nodes and replicas over time and the cold start: burst start to the first token
served by the new cloud replica, split into the scale decision, node start, replica start (process
and imports), model source, engine load, registration and the first spilled token. ``--json``
writes everything for tests and plots.

The demo drives its own cluster (its own ports); it never touches another Ray cluster on the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, SpillwayConfig, load_config

PROJECT_ROOT = DEFAULT_CONFIG_PATH.parent.parent
FAKE_RAY_CONFIG = PROJECT_ROOT / "cluster_configs" / "ray" / "fake-multinode.yaml"
DEMO_SERVE_CONFIG = PROJECT_ROOT / "cluster_configs" / "serve" / "fake-cloud.yaml"
DEFAULT_RAY_PORT = 6395
SAMPLE_EVERY_S = 0.5
HEAD_START_TIMEOUT_S = 60.0


@dataclass
class BurstPlan:
    concurrency: int = 24           # streams at once (6 x on-prem's slots: about 5 s of wait on-prem)
    max_tokens: int = 128
    cloud_answers: int = 6          # stop once a cloud replica has served this many
    burst_timeout_s: float = 420.0  # cloud capacity must come within this
    drain_timeout_s: float = 300.0  # and go within this after the burst


@dataclass
class Sample:
    t: float                 # seconds since the burst started (negative: before it)
    cloud_nodes: int
    cloud_replicas: int      # RUNNING
    scaler_target: int | None


@dataclass
class DemoResult:
    samples: list[Sample] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)
    scale_events: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"samples": [s.__dict__ for s in self.samples], "requests": self.requests,
                "breakdown": self.breakdown, "scale_events": self.scale_events,
                "timeline": timeline(self.samples)}


def timeline(samples: list[Sample]) -> list[dict]:
    """The samples where cloud nodes, replicas or the scaler's target changed."""
    rows, last = [], None
    for s in samples:
        key = (s.cloud_nodes, s.cloud_replicas, s.scaler_target)
        if key != last:
            rows.append(s.__dict__)
            last = key
    return rows


class FakeCloudCluster:
    """A Ray head with the fake multi-node autoscaler; stopped with every node it started."""

    def __init__(self, ray_port: int, head_cpus: int, env: dict[str, str], log: Callable[[str], None]):
        self.ray_port = ray_port
        self.head_cpus = head_cpus
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="spillway-fake-cloud-"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ray_port}"

    def start(self) -> None:
        raw = yaml.safe_load(FAKE_RAY_CONFIG.read_text())
        raw["provider"]["gcs_address"] = self.address
        autoscaling_config = self.workdir / "fake-multinode.yaml"
        autoscaling_config.write_text(yaml.safe_dump(raw))
        head_resources = {k: v for k, v in raw["available_node_types"][raw["head_node_type"]]["resources"].items()
                          if k not in ("CPU", "GPU")}
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", f"--port={self.ray_port}", f"--num-cpus={self.head_cpus}",
               f"--autoscaling-config={autoscaling_config}", "--resources=" + json.dumps(head_resources),
               "--disable-usage-stats", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.ray_port + 1900}"]
        env = {**os.environ, **self.env, "RAY_FAKE_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        out = open(self.workdir / "head.log", "w")
        self.log(f"starting the fake-cloud head at {self.address} (log {self.workdir / 'head.log'})")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.proc.returncode}); see {self.workdir / 'head.log'}")
            probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={self.address!r}, "
                                    "logging_level='ERROR', log_to_driver=False)"],
                                   capture_output=True, env=env, timeout=60)
            if probe.returncode == 0:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the fake-cloud head did not come up within {HEAD_START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        """Every process of this cluster (head, monitor, fake nodes, engines) shares the head's
        session: signal that session only, never `ray stop` (it would stop other clusters too)."""
        from serve_app.ops.local_cluster import _reap_sessions

        if self.proc is None:
            return
        session = os.getsid(self.proc.pid) if self.proc.poll() is None else self.proc.pid
        _reap_sessions({session})
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


class Sampler(threading.Thread):
    """Cloud nodes (alive, with the site's resource), RUNNING cloud replicas and the scaler's target."""

    def __init__(self, config: SpillwayConfig, deployment: str, cloud_resource: str):
        super().__init__(daemon=True)
        self.config, self.deployment, self.cloud_resource = config, deployment, cloud_resource
        self.raw: list[tuple[float, int, int, int | None]] = []  # (wall time, nodes, replicas, target)
        self.node_first_seen: float | None = None
        self.stop_event = threading.Event()
        self.errors = 0

    def run(self) -> None:
        import ray
        from ray import serve

        operator = serve.get_deployment_handle("operator", app_name=self.config.name)
        while not self.stop_event.is_set():
            try:
                nodes = sum(1 for n in ray.nodes() if n["Alive"] and self.cloud_resource in n["Resources"])
                app = serve.status().applications.get(self.config.name)
                dep = app.deployments.get(self.deployment) if app else None
                running = int(dep.replica_states.get("RUNNING", 0)) if dep else 0
                target = operator.scale_status.remote().result(timeout_s=5)["deployments"][self.deployment]["replicas"]
                now = time.time()
                if nodes and self.node_first_seen is None:
                    self.node_first_seen = now
                self.raw.append((now, nodes, running, target))
            except Exception:  # noqa: BLE001 - a missed sample is only a gap in the table
                self.errors += 1
            self.stop_event.wait(SAMPLE_EVERY_S)


async def burst(base_url: str, model: str, plan: BurstPlan, log: Callable[[str], None]) -> tuple[dict, float | None]:
    """Streams until the cloud has answered ``plan.cloud_answers`` requests. Returns the counts by
    outcome and the wall time of the first token a cloud replica streamed."""
    import aiohttp

    counts: dict[str, int] = {"ok_onprem": 0, "ok_cloud": 0, "failed": 0}
    first_cloud_token: list[float] = []
    done = asyncio.Event()
    body = {"model": model, "stream": True, "max_tokens": plan.max_tokens, "temperature": 0.8,
            "messages": [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}]}

    async def user(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            try:
                async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                    site = resp.headers.get("x-spillway-site", "?")
                    first = None
                    async for line in resp.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.time()
                    if resp.status != 200:
                        counts["failed"] += 1
                        log(f"request failed: HTTP {resp.status}")
                        continue
                    counts[f"ok_{site}"] = counts.get(f"ok_{site}", 0) + 1
                    if site == "cloud" and first is not None:
                        first_cloud_token.append(first)
                        if counts["ok_cloud"] >= plan.cloud_answers:
                            done.set()
            except aiohttp.ClientError as exc:
                counts["failed"] += 1
                log(f"request failed: {exc!r}")

    timeout = aiohttp.ClientTimeout(total=plan.burst_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        users = [asyncio.create_task(user(session)) for _ in range(plan.concurrency)]
        try:
            await asyncio.wait_for(done.wait(), plan.burst_timeout_s)
        except asyncio.TimeoutError:
            log(f"no cloud capacity within {plan.burst_timeout_s:.0f}s")
        done.set()
        await asyncio.gather(*users, return_exceptions=True)  # in-flight requests finish: none is dropped
    return counts, (min(first_cloud_token) if first_cloud_token else None)


def wait_until(predicate: Callable[[], bool], timeout_s: float, every_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()


def engine_startup(base_url: str, model: str, site: str) -> dict[str, float] | None:
    """The cloud replica's start-up stamps, from the router's /health (which asks the replica over
    its port: a Serve call would make Serve start a replica of its own at zero)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=30) as resp:
            report = json.loads(resp.read())
        return report["models"][model][site].get("startup")
    except Exception:  # noqa: BLE001 - the breakdown then lacks the replica's own stamps
        return None


def node_started_at(cloud_resource: str) -> float | None:
    """When the first cloud node's raylet started (Ray's state API), wall-clock seconds."""
    try:
        from ray.util.state import list_nodes

        starts = [n.start_time_ms / 1000 for n in list_nodes(detail=True)
                  if n.state == "ALIVE" and cloud_resource in (n.resources_total or {}) and n.start_time_ms]
        return min(starts) if starts else None
    except Exception:  # noqa: BLE001
        return None


def cold_start(t0: float, scale_at: float | None, node_at: float | None, startup: dict | None,
               first_token_at: float | None) -> dict[str, float]:
    """Seconds per step from the burst's start to the first cloud token (steps whose stamps are
    missing are left out; their time shows in the next step present)."""
    stamps = [("scale decision", scale_at), ("node start", node_at)]
    if startup:
        stamps += [("replica start (process, imports)", startup.get("init_at")),
                   ("model source", startup.get("source_ready_at")),
                   ("engine load", startup.get("engine_ready_at")),
                   ("registration", startup.get("registered_at"))]
    stamps.append(("first spilled token", first_token_at))
    breakdown, last = {}, t0
    for name, at in stamps:
        if at is None:
            continue
        breakdown[name] = round(max(0.0, at - last), 1)
        last = max(last, at)
    if first_token_at is not None:
        breakdown["total"] = round(first_token_at - t0, 1)
    return breakdown


def serve_deploy(serve_config: Path, dashboard: str, log: Callable[[str], None]) -> None:
    """Ray Serve's own CLI, as an ML engineer deploys: `serve deploy <yaml> -a <dashboard>`."""
    serve_bin = str(Path(sys.executable).with_name("serve"))
    log(f"serve deploy {serve_config.relative_to(PROJECT_ROOT)} -a {dashboard}")
    subprocess.run([serve_bin, "deploy", str(serve_config), "-a", dashboard], cwd=PROJECT_ROOT, check=True,
                   timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def run_demo(serve_config: Path = DEMO_SERVE_CONFIG, ray_port: int = DEFAULT_RAY_PORT, plan: BurstPlan | None = None,
             log: Callable[[str], None] = print, session_file: Path | None = None) -> DemoResult:
    import ray
    from ray import serve

    from serve_app.app import deployment_name
    from serve_app.ops.deploy import wait_healthy

    from serve_app.ops.local_cluster import AUTH_MODE_ENV, DEFAULT_LOCAL_AUTH_MODE

    # As for `spillway up --local`: one auth mode for the cluster's processes and this driver.
    os.environ.setdefault(AUTH_MODE_ENV, DEFAULT_LOCAL_AUTH_MODE)
    plan = plan or BurstPlan()
    (application,) = yaml.safe_load(serve_config.read_text())["applications"]
    config = load_config(PROJECT_ROOT / application["args"]["config"])
    cloud = next(s for s in config.sites if s.kind.value == "cloud")
    model = next(m for m in config.models if cloud.name in m.autoscaling)
    deployment = deployment_name(model.id, cloud.name)
    head_cpus = int(yaml.safe_load(FAKE_RAY_CONFIG.read_text())["available_node_types"]["ray.head.default"]
                    ["resources"]["CPU"])
    cluster = FakeCloudCluster(ray_port, head_cpus, config.http.ingress_env(config.router.replicas), log)
    result = DemoResult()
    t0 = time.time()
    sampler = Sampler(config, deployment, cloud.resource)
    try:
        cluster.start()
        if session_file is not None:
            session_file.write_text(str(os.getsid(cluster.proc.pid)))
        serve_deploy(serve_config, f"http://127.0.0.1:{cluster.ray_port + 1900}", log)
        wait_healthy(config, log=log)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False, namespace="spillway")
        sampler.start()
        wait_until(lambda: len(sampler.raw) > 0, 30, 0.2)
        log(f"deployed; cloud replicas {sampler.raw[-1][2] if sampler.raw else '?'}, "
            f"cloud nodes {sampler.raw[-1][1] if sampler.raw else '?'}; bursting "
            f"{plan.concurrency} streams of {plan.max_tokens} tokens")
        t0 = time.time()
        base_url = f"http://{config.http.host}:{config.http.port}"
        counts, first_cloud_token = asyncio.run(burst(base_url, model.id, plan, log))
        result.requests = counts
        startup = engine_startup(base_url, model.id, cloud.name) if first_cloud_token else None
        node_at = node_started_at(cloud.resource) or sampler.node_first_seen
        scaler_status = (serve.get_deployment_handle("operator", app_name=config.name).scale_status.remote()
                         .result(timeout_s=10))
        result.scale_events = scaler_status["history"]
        scale_at = next((e["at"] for e in result.scale_events
                         if e["deployment"] == deployment and e["to"] > 0 and e["at"] >= t0), None)
        result.breakdown = cold_start(t0, scale_at, node_at, startup, first_cloud_token)
        log(f"burst over: {counts}; waiting for the cloud replica and node to go")
        wait_until(lambda: bool(sampler.raw) and sampler.raw[-1][1] == 0 and sampler.raw[-1][2] == 0,
                   plan.drain_timeout_s)
        time.sleep(2 * SAMPLE_EVERY_S)  # (one more sample at the settled state)
    finally:
        sampler.stop_event.set()
        if sampler.is_alive():
            sampler.join(timeout=10)
        result.samples = [Sample(round(at - t0, 1), nodes, replicas, target)
                          for at, nodes, replicas, target in sampler.raw]
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.stop()
    return result


def print_report(result: DemoResult, log: Callable[[str], None] = print) -> None:
    log("\ncloud capacity over time (changes only)")
    log(f"{'t (s)':>8}  {'cloud nodes':>11}  {'cloud replicas':>14}  {'scaler target':>13}")
    for row in timeline(result.samples):
        log(f"{row['t']:>8.1f}  {row['cloud_nodes']:>11}  {row['cloud_replicas']:>14}  {str(row['scaler_target']):>13}")
    log("\ncold start: burst start to the first token from the new cloud replica")
    for name, seconds in result.breakdown.items():
        log(f"  {name:<36} {seconds:>7.1f} s")
    log(f"\nrequests: {result.requests}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="spillway demo cloud-burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-config", type=Path, default=DEMO_SERVE_CONFIG,
                        help="the `serve deploy` YAML (its args.config names the Spillway config)")
    parser.add_argument("--ray-port", type=int, default=DEFAULT_RAY_PORT)
    parser.add_argument("--concurrency", type=int, default=BurstPlan.concurrency)
    parser.add_argument("--max-tokens", type=int, default=BurstPlan.max_tokens)
    parser.add_argument("--json", type=Path, help="write samples, timeline, breakdown and counts here")
    parser.add_argument("--session-file", type=Path,
                        help="write the cluster's session id here (a caller that kills this demo can reap it)")
    args = parser.parse_args(argv)
    result = run_demo(args.serve_config.resolve(), args.ray_port, BurstPlan(concurrency=args.concurrency, max_tokens=args.max_tokens),
                      session_file=args.session_file)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
