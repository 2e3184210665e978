"""A real multi-node Ray cluster on one machine, one node per site.

Each node is a ``ray start --block`` process in its own process group, with
the site's custom resource (``site:onprem``, ``site:cloud``) and a declared
number of logical CPUs (with 2 real cores Ray otherwise cannot place the
ingress next to the engines). The PIDs go into a state file, so ``down`` stops
exactly this cluster and never another Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import LocalClusterConfig, SpillwayConfig

SERVE_SHUTDOWN_TIMEOUT_S = 120.0
DEFAULT_STATE_FILE = Path(os.environ.get("SPILLWAY_STATE_DIR", Path.home() / ".cache" / "spillway")) / "local-cluster.json"
SITE_RESOURCE_AMOUNT = 1000  # per node; bundles ask for a sliver, so this never limits placement
NODE_JOIN_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
# Ray 2.60 turns token authentication on for `ray start` whenever ~/.ray/auth_token exists (any
# earlier local `ray.init()` writes one), but a client connecting to an existing cluster only sends
# the token when RAY_AUTH_MODE=token is set: the nodes then reject our own driver. The local
# cluster therefore pins the mode for every process it starts and for this process; a mode the
# user set explicitly wins.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
DEFAULT_LOCAL_AUTH_MODE = "disabled"


class LocalClusterError(RuntimeError):
    pass


@dataclass
class LocalCluster:
    config: SpillwayConfig
    state_file: Path = DEFAULT_STATE_FILE

    def __post_init__(self):
        os.environ.setdefault(AUTH_MODE_ENV, DEFAULT_LOCAL_AUTH_MODE)

    @property
    def cluster(self) -> LocalClusterConfig:
        if self.config.local_cluster is None:
            raise LocalClusterError("the config has no local_cluster section; add nodes to run `spillway up --local`")
        return self.config.local_cluster

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.cluster.ray_port}"

    def is_running(self) -> bool:
        state = self._read_state()
        return bool(state) and all(_alive(pid) for pid in state["pids"])

    def start(self, log=print) -> None:
        if self.is_running():
            log(f"local cluster already running at {self.address}")
            return
        if _port_in_use(self.cluster.ray_port):
            raise LocalClusterError(
                f"port {self.cluster.ray_port} is taken (another Ray cluster?); stop it or set local_cluster.ray_port"
            )
        ray_bin = str(Path(sys.executable).with_name("ray"))
        pids = []
        env = dict(os.environ)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.update(self.config.http.ingress_env(self.config.router.replicas))
        admin_env = self.config.governance.admin_key_env
        if not env.get(admin_env):
            env[admin_env] = ensure_admin_key(self.state_file.parent)
            log(f"admin key (for 'spillway keys', 'spillway usage' and the admin API): {admin_key_path(self.state_file.parent)}")
        log_dir = self.state_file.parent / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for index, node in enumerate(self.cluster.nodes):
                site = self.config.site(node.site)
                cmd = [ray_bin, "start", "--block", f"--num-cpus={node.num_cpus}", "--disable-usage-stats",
                       f"--metrics-export-port={self.cluster.metrics_export_port + index}"]
                cmd.append("--resources=" + json.dumps({site.resource: SITE_RESOURCE_AMOUNT}))
                if node.memory_gib:
                    cmd.append(f"--memory={int(node.memory_gib * 1024**3)}")
                if index == 0:
                    cmd += [
                        "--head",
                        f"--port={self.cluster.ray_port}",
                        "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={self.cluster.dashboard_port}",
                    ]
                else:
                    cmd.append(f"--address={self.address}")
                log(f"starting Ray node {index} for site '{site.name}' ({site.resource}, {node.num_cpus} logical CPUs)")
                out = open(log_dir / f"node-{index}-{site.name}.log", "w")
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                pids.append(proc.pid)
                self._write_state(pids)
                self._wait_for_nodes(index + 1, proc)
        except BaseException:
            self.stop(log=lambda *_: None)
            raise
        log(f"local cluster up: {len(pids)} nodes, Ray at {self.address}, dashboard http://127.0.0.1:{self.cluster.dashboard_port}")

    def stop(self, log=print) -> bool:
        state = self._read_state()
        if not state:
            log("no local cluster recorded; nothing to stop")
            return False
        if all(_alive(pid) for pid in state["pids"][:1]):
            self._shutdown_serve(log)
        # Every process of the cluster shares the session of its `ray start` process, also those
        # that made process groups of their own (HAProxy, vLLM's engine processes): reap them all.
        sessions = {sid for sid in (_session_of(pid) for pid in state["pids"]) if sid is not None}
        # Workers first, then the head: stop in reverse start order.
        for pid in reversed(state["pids"]):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in state["pids"]):
            time.sleep(0.5)
        for pid in state["pids"]:
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
        _reap_sessions(sessions)
        self.state_file.unlink(missing_ok=True)
        log("local cluster stopped")
        return True

    def _shutdown_serve(self, log) -> None:
        """Shut Serve down first, so every replica stops gracefully: routers send their last
        settlements and the ledger writes what it holds (a signal would cut them off)."""
        script = ("import ray; from ray import serve; "
                  f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); serve.shutdown()")
        try:
            subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=SERVE_SHUTDOWN_TIMEOUT_S,
                           env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        except subprocess.TimeoutExpired:
            log(f"Serve did not shut down within {SERVE_SHUTDOWN_TIMEOUT_S:.0f}s; stopping the nodes anyway")

    def _wait_for_nodes(self, expected: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + NODE_JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalClusterError(f"ray start exited with {proc.returncode}; see {self.state_file.parent / 'logs'}")
            if self._alive_nodes() >= expected:
                return
            time.sleep(1.0)
        raise LocalClusterError(f"Ray node {expected - 1} did not join within {NODE_JOIN_TIMEOUT_S:.0f}s")

    def _alive_nodes(self) -> int:
        probe = (
            "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        if not _port_in_use(self.cluster.ray_port):
            return 0
        result = subprocess.run(
            [sys.executable, "-c", probe, self.address], capture_output=True, text=True, timeout=60,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_state(self, pids: list[int]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"address": self.address, "pids": pids}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _reap_sessions(sessions: set[int], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every process left in ``sessions``."""
    import psutil

    def left() -> list:
        procs = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in sessions and proc.pid != os.getpid():
                    procs.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return procs

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in left():
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(left(), timeout=timeout_s)
        if not alive:
            return


def admin_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / "admin-key"


def ensure_admin_key(state_dir: Path) -> str:
    """The local cluster's admin key: made once (random), kept readable by this user only."""
    path = admin_key_path(state_dir)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "spw-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
