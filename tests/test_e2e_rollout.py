"""End to end: progressive rollouts on the real cluster, driven through the admin API and the CLI.
A healthy canary (MoE behind an alias the dense model serves) is raised step by step and promoted;
a canary whose engine dies is rolled back on its own, and the clients kept on the stable version
(sticky per user) see no failed request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.conftest import admin_headers, auth
from tests.test_e2e_sites import _kill, _replica_actors

pytestmark = pytest.mark.e2e

DENSE, MOE = "spillway-dense", "spillway-moe"
VARIANT = "x-spillway-variant"
RECOVERY_TIMEOUT_S = 300


def rollout_status(base_url: str, alias: str) -> dict:
    rows = httpx.get(f"{base_url}/v1/spillway/admin/rollouts", headers=admin_headers(), timeout=30).json()["data"]
    return next(r for r in rows if r["alias"] == alias)


USERS_PER_CLIENT = 10


async def drive(base_url: str, alias: str, clients: int, until, timeout_s: float) -> list[tuple[str, int, str]]:
    """Clients send short requests to ``alias`` until ``until()`` holds, each cycling through its own
    ``USERS_PER_CLIENT`` user ids (so some users land on a 20 % canary whatever the alias hashes to).
    Returns (user, status, variant) per request."""
    results: list[tuple[str, int, str]] = []
    deadline = time.monotonic() + timeout_s
    done = asyncio.Event()

    async def client(http: httpx.AsyncClient, name: str) -> None:
        sent = 0
        while not done.is_set() and time.monotonic() < deadline:
            user = f"{name}-{sent % USERS_PER_CLIENT}"
            sent += 1
            resp = await http.post("/v1/chat/completions", json={
                "model": alias, "user": user, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            results.append((user, resp.status_code, resp.headers.get(VARIANT, "")))

    async def watch() -> None:
        while time.monotonic() < deadline:
            if await asyncio.to_thread(until):
                break
            await asyncio.sleep(0.5)
        done.set()

    async with httpx.AsyncClient(base_url=base_url, headers=auth(), timeout=120) as http:
        await asyncio.gather(watch(), *(client(http, f"user-{i}") for i in range(clients)))
    return results


def start(base_url: str, **spec) -> dict:
    """Start a rollout, then wait until every router replica serves its alias (the one that took
    the call at once, the others within a second): 20 answers in a row from /v1/models."""
    resp = httpx.post(f"{base_url}/v1/spillway/admin/rollouts", headers=admin_headers(), json=spec, timeout=30)
    assert resp.status_code == 201, resp.text
    seen, deadline = 0, time.monotonic() + 30
    while seen < 20 and time.monotonic() < deadline:
        listed = {m["id"] for m in httpx.get(f"{base_url}/v1/models", headers=auth(), timeout=30).json()["data"]}
        seen = seen + 1 if spec["alias"] in listed else 0
    assert seen >= 20, "the routers never all served the new alias"
    return resp.json()


def test_a_healthy_canary_is_raised_in_steps_and_promoted(base_url, e2e_cluster):
    alias = f"rollout-ok-{uuid.uuid4().hex[:6]}"
    first = start(base_url, alias=alias, stable=DENSE, canary=MOE, steps=[20, 60, 100], step_s=3, min_requests=3,
                  max_error_rate_delta=0.2, max_ttft_ratio=50)
    assert (first["state"], first["canary_percent"]) == ("running", 20)
    results = asyncio.run(drive(base_url, alias, 6, lambda: rollout_status(base_url, alias)["state"] != "running",
                                timeout_s=180))
    status = rollout_status(base_url, alias)
    assert status["state"] == "promoted", (status["reason"], status["window"], status["history"])
    assert [e["event"].split(":")[0] for e in status["history"]][:3] == [
        "started at 20.0% canary", "raised to 60.0% canary", "raised to 100.0% canary"]
    assert all(code == 200 for _, code, _ in results)
    assert {variant for _, _, variant in results} == {DENSE, MOE}
    # Once the routers apply the final weights, every user is on the canary.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        variants = {httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=60, json={
            "model": alias, "user": f"late-{i}", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        ).headers[VARIANT] for i in range(8)}
        if variants == {MOE}:
            break
        time.sleep(0.5)
    assert variants == {MOE}
    # The CLI reads the same state.
    out = subprocess.run([sys.executable, "-m", "serve_app.ops.cli", "rollout", "status", "--json",
                          "--config", str(e2e_cluster[1]), "--url", base_url],
                         capture_output=True, text=True, timeout=60, check=True)
    assert any(r["alias"] == alias and r["state"] == "promoted" for r in json.loads(out.stdout))


def test_a_canary_whose_engine_dies_is_rolled_back_and_stable_clients_see_no_failure(base_url, e2e_cluster):
    config = e2e_cluster[0]
    alias = f"rollout-bad-{uuid.uuid4().hex[:6]}"
    start(base_url, alias=alias, stable=DENSE, canary=MOE, steps=[30, 100], step_s=60, min_requests=3,
          max_error_rate_delta=0.05, max_ttft_ratio=50)
    killed = []

    def until() -> bool:
        if not killed:  # the canary's engine dies once the rollout is under way
            killed.append(_kill(_replica_actors(config.name, "engine-spillway-moe-onprem")))
        return rollout_status(base_url, alias)["state"] != "running"

    try:
        results = asyncio.run(drive(base_url, alias, 8, until, timeout_s=120))
        status = rollout_status(base_url, alias)
        assert killed == [1]
        assert status["state"] == "rolled_back", (status["reason"], status["window"], status["history"])
        assert "server-error rate" in status["reason"]
        failed = [(user, code, variant) for user, code, variant in results if code != 200]
        assert failed and all(variant == MOE for _, _, variant in failed)  # only the canary's clients
        assert all(code == 200 for _, code, variant in results if variant == DENSE)
        stable_users = {u for u, _, v in results} - {u for u, _, v in results if v == MOE}
        assert stable_users  # clients that stayed on the stable version the whole time
        # Rolled back: every user is on the stable version again once the routers apply it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            variants = {httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=60, json={
                "model": alias, "user": f"after-{i}", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}).headers.get(VARIANT) for i in range(8)}
            if variants == {DENSE}:
                break
            time.sleep(0.5)
        assert variants == {DENSE}
    finally:  # Serve replaces the killed engine: wait for it, so the cluster is whole again
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            report = httpx.get(f"{base_url}/health", timeout=30)
            if report.status_code == 200 and report.json()["models"][MOE]["onprem"].get("healthy") \
                    and httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=60, json={
                        "model": MOE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                    ).status_code == 200:
                break
            time.sleep(2)
