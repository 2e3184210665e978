"""End to end: a new model version (a new version label and new engine arguments) redeployed under
a Locust load replaces the model's engine replicas on both sites with no failed request. Serve
starts each replacement before the old replica stops (surge), the old replica drains its streams,
and routers and the ledger keep running (their arguments do not change with a model's version)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.app import build_app, deployment_name
from serve_app.config import load_config
from tests.conftest import auth

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DENSE = "spillway-dense"
ROLL_TIMEOUT_S = 420
LOAD_DURATION_S = 240


def replica_ids(app: str) -> dict[str, set[str]]:
    """RUNNING replica ids per deployment (Serve's own view)."""
    from ray import serve
    from ray.util.state import list_actors

    ids: dict[str, set[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
        name = actor.name or ""
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            _, deployment, replica = name.split("#", 2)
            ids.setdefault(deployment, set()).add(replica)
    status = serve.status().applications[app].deployments
    return {d: ids.get(d, set()) for d in status}


def wait_for(predicate, timeout_s: float, every_s: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_new_version_rolls_the_engines_under_load_with_no_failed_request(e2e_cluster, base_url, tmp_path):
    from ray import serve

    config, config_path, _ = e2e_cluster
    engines = {deployment_name(DENSE, site) for site in ("onprem", "cloud")}
    before = replica_ids(config.name)
    assert all(before[d] for d in engines)

    out = tmp_path / "load"
    load = subprocess.Popen(
        [sys.executable, "-m", "loadtests.run", "--host", base_url, "--scenario", "mixed", "-u", "6", "-r", "6",
         "-t", f"{LOAD_DURATION_S}s", "--max-tokens", "uniform:8-32", "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The load is on once the routers have admitted requests for the model.
        wait_for(lambda: any(g["in_flight"] for g in httpx.get(f"{base_url}/v1/spillway/scheduler", timeout=30)
                             .json()["models"][DENSE]["groups"].values()), 60, 0.2, "the load to start")
        raw = yaml.safe_load(config_path.read_text())
        raw["models"][0]["version"] = f"v2-{uuid.uuid4().hex[:6]}"
        raw["models"][0]["engine"]["extra_args"] = {"max_num_batched_tokens": 4096}
        serve.run(build_app(load_config(raw)), name=config.name, route_prefix="/", blocking=False)

        def rolled():
            now = replica_ids(config.name)
            done = all(now[d] and not (now[d] & before[d]) for d in engines)
            return now if done and serve.status().applications[config.name].status == "RUNNING" else None

        after = wait_for(rolled, ROLL_TIMEOUT_S, 2.0, "the dense replicas to be replaced")
        # Only the rolled model's engines changed: routers, the ledger and the other model kept theirs.
        for deployment, ids in before.items():
            if deployment not in engines:
                assert after[deployment] == ids, deployment
        output, _ = load.communicate(timeout=LOAD_DURATION_S + 120)
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode == 0, output[-3000:]
    with (out / "locust_stats.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 50
    assert all(int(row["Failure Count"]) == 0 for row in rows), [r for r in rows if int(r["Failure Count"])]
    # The new engines serve.
    resp = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=120,
                      json={"model": DENSE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert resp.status_code == 200
