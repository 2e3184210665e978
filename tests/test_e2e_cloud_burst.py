"""Cloud capacity from zero, the whole chain on this machine (`spillway demo cloud-burst`): a Ray
head with the fake multi-node provider (cluster_configs/ray/fake-multinode.yaml), Spillway deployed
with `serve deploy cluster_configs/serve/fake-cloud.yaml` (a cloud deployment at 0..1 replicas), a
burst of streaming requests. Real Ray autoscaler, real Serve, real vLLM engines on both sites.

The demo runs in its own process and cluster (its own ports), beside the session's e2e cluster."""

import json
import os
import subprocess
import sys

import pytest

from serve_app.app import PROJECT_ROOT
from serve_app.ops.cloud_burst import BurstPlan

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT_S = 840


@pytest.fixture
def demo_run(tmp_path):
    out, session_file = tmp_path / "burst.json", tmp_path / "session"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cloud_burst", "--json", str(out), "--session-file", str(session_file)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False)
    try:
        yield proc, (json.loads(out.read_text()) if out.exists() else None)
    finally:
        if session_file.exists():  # the demo stops its cluster itself; this catches a demo that died
            from serve_app.ops.local_cluster import _reap_sessions

            _reap_sessions({int(session_file.read_text())})


def test_burst_brings_cloud_nodes_and_replicas_from_zero_serves_there_and_returns_to_zero(demo_run):
    proc, result = demo_run
    report = proc.stdout[proc.stdout.find("cloud capacity over time"):]
    artifacts = PROJECT_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "cloud-burst.txt").write_text(report)
    print(report)  # the timeline and the cold-start breakdown (shown with -rP, and on failure)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Deployed with Ray Serve's own CLI from the repository's serve config.
    assert "serve deploy cluster_configs/serve/fake-cloud.yaml" in proc.stdout
    timeline = result["timeline"]
    first, last = timeline[0], timeline[-1]
    # Before the burst: no cloud node, no cloud replica.
    assert (first["cloud_nodes"], first["cloud_replicas"]) == (0, 0) and first["t"] <= 0
    # During it: the scaler asked for a replica, Ray's autoscaler added a node, the replica ran there.
    assert max(row["scaler_target"] or 0 for row in timeline) >= 1
    node_at = next(row["t"] for row in timeline if row["cloud_nodes"] >= 1)
    replica_at = next(row["t"] for row in timeline if row["cloud_replicas"] >= 1)
    assert 0 < node_at <= replica_at
    # After it: the replica and then the node went away.
    assert (last["cloud_nodes"], last["cloud_replicas"], last["scaler_target"]) == (0, 0, 0)
    gone_at = next(row["t"] for row in timeline if row["t"] > replica_at and row["cloud_replicas"] == 0)
    assert last["t"] >= gone_at
    # Traffic was served in the cloud once it came, on-prem meanwhile, and no request failed.
    requests = result["requests"]
    assert requests["failed"] == 0
    assert requests["ok_cloud"] >= BurstPlan.cloud_answers and requests["ok_onprem"] > 0
    # The cold start, step by step, adds up to the burst-to-first-cloud-token time.
    breakdown = result["breakdown"]
    steps = {name: s for name, s in breakdown.items() if name != "total"}
    assert {"scale decision", "node start", "engine load", "first spilled token"} <= set(steps)
    assert breakdown["engine load"] > 0 and breakdown["total"] > 0
    assert abs(sum(steps.values()) - breakdown["total"]) <= 0.1 * len(steps)
