"""End to end: `http.ingress: direct` on its own small cluster. The router replica itself
listens on http.port (Serve's head proxy is moved past the routers' port range), so clients reach
the router with no proxy hop; streams, non-streamed answers and errors behave as through the proxy."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, load_config

pytestmark = pytest.mark.e2e

HTTP_PORT = 8750
DENSE = "spillway-dense"


def _config(root) -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["name"] = "spillway-direct"
    raw["sites"] = [s for s in raw["sites"] if s["name"] == "onprem"]
    dense = next(m for m in raw["models"] if m["id"] == DENSE)
    dense["replicas"] = {"onprem": 1}
    dense["engine"]["max_num_seqs"] = 8
    raw["models"] = [dense]
    raw["router"]["replicas"] = 1
    raw["router"].pop("semantic_routes")  # (its targets are gone with the other models)
    raw["governance"] = {"store": {"path": str(root / "ledger.sqlite3")}}  # its own ledger: open, no keys
    raw["http"] = {"host": "127.0.0.1", "port": HTTP_PORT, "ingress": "direct"}
    raw["local_cluster"] = {"ray_port": 6392, "dashboard_port": 8292, "metrics_export_port": 8770,
                            "nodes": [{"site": "onprem", "num_cpus": 8}]}
    return raw


START = """
import sys
from pathlib import Path
from serve_app.config import load_config
from serve_app.ops.deploy import deploy
from serve_app.ops.local_cluster import LocalCluster
config = load_config(sys.argv[1])
cluster = LocalCluster(config, state_file=Path(sys.argv[2]))
cluster.start(log=print)
deploy(config, cluster.address, log=print)
"""


@pytest.fixture(scope="module")
def direct_cluster(tmp_path_factory):
    """Started from a child process: this test process stays connected to the session's cluster."""
    import os
    import subprocess
    import sys

    from serve_app.ops.local_cluster import LocalCluster

    root = tmp_path_factory.mktemp("spillway-direct")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(_config(root)))
    config = load_config(path)
    state = root / "cluster.json"
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the session cluster's
        subprocess.run([sys.executable, "-c", START, str(path), str(state)], check=True, timeout=600,
                       cwd=DEFAULT_CONFIG_PATH.parent.parent, env=env)
        yield config, f"http://127.0.0.1:{HTTP_PORT}"
    finally:
        LocalCluster(config, state_file=state).stop(log=print)


def _listener(port: int) -> str:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).name()
    return ""


def test_router_replica_owns_the_port_and_serves_without_the_proxy(direct_cluster):
    config, base_url = direct_cluster
    assert "ServeRepli" in _listener(HTTP_PORT)  # the router replica, not ray::ProxyActor
    assert "ProxyActor" in _listener(config.http.proxy_port(config.router.replicas))

    body = {"model": DENSE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["x-spillway-site"] == "onprem"
        events = [e for e in resp.read().decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 8

    plain_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    plain = httpx.post(f"{base_url}/v1/chat/completions", json=plain_body, timeout=120)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["completion_tokens"] == 8
    missing = httpx.post(f"{base_url}/v1/chat/completions", json={**plain_body, "model": "nope"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
