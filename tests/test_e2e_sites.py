"""End to end: engines sit on the nodes of their site; losing an engine before the first token
fails over to another site, or gives a clean 503 when no site is left; the CLI reports it all.

Runs last among the end-to-end tests (file order): it kills engine replicas and waits for
Serve to bring them back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import E2E_CENTRAL, auth, router_dispatch_views

pytestmark = pytest.mark.e2e

DENSE, MOE, EMBED = "spillway-dense", "spillway-moe", "all-minilm-l6-v2"
HELLO = [{"role": "user", "content": "hi"}]
RECOVERY_TIMEOUT_S = 300


def _health(base_url):
    return httpx.get(f"{base_url}/health", timeout=30)


def test_every_engine_runs_on_a_node_of_its_site(base_url, e2e_cluster):
    import ray

    config = e2e_cluster[0]
    node_site = {}
    for node in ray.nodes():
        for site in config.sites:
            if node["Alive"] and site.resource in node["Resources"]:
                node_site[node["NodeID"]] = site.name
    assert sorted(node_site.values()) == ["cloud", "onprem"]
    report = _health(base_url).json()["models"]
    placed = {(model, site): node_site[stats["node_id"]] for model, sites in report.items()
              for site, stats in sites.items() if stats.get("kind") != "external"}
    assert placed == {(DENSE, "onprem"): "onprem", (DENSE, "cloud"): "cloud", (MOE, "onprem"): "onprem",
                      (EMBED, "onprem"): "onprem"}


def test_the_moe_engine_loaded_its_weights_from_s3_and_serves(base_url, e2e_cluster):
    """The session config's MoE source is s3://… on the session's S3-compatible server: its replica
    downloaded and verified the model into the node-local cache, and vLLM serves from that copy."""
    from tests.conftest import E2E_STATE, e2e_moe_local_copy

    assert e2e_cluster[0].model(MOE).source == E2E_STATE["moe_source"]
    state = json.loads((e2e_moe_local_copy() / ".spillway-source.json").read_text())
    assert state["source"] == E2E_STATE["moe_source"] and "model.safetensors" in state["objects"]
    resp = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(), timeout=120,
                      json={"model": MOE, "messages": HELLO, "max_tokens": 4})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] > 0


def test_status_cli_shows_sites_deployments_and_replicas(e2e_cluster):
    config_path = e2e_cluster[1]
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.ops.cli", "status", "--config", str(config_path), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    report = json.loads(out.stdout)
    assert report["application"] == "RUNNING"
    assert {site: len(nodes) for site, nodes in report["sites"].items()} == {"onprem": 1, "cloud": 1}
    assert report["router"]["replicas"] == {"RUNNING": 2}  # the test config runs two routers
    engines = {(e["model"], e["site"]): e["state"] for e in report["engines"]}
    assert set(engines) == {(DENSE, "onprem"), (DENSE, "cloud"), (MOE, "onprem"), (EMBED, "onprem")}
    assert report["external_sites"] == {"api": {"base_url": e2e_cluster[0].site("api").external.base_url,
                                                "models": [E2E_CENTRAL]}}
    assert all(state["status"] == "HEALTHY" and state["replicas"] == {"RUNNING": 1} for state in engines.values())


def _replica_actors(app_name: str, deployment: str) -> list[int]:
    """The process ids of the deployment's live replicas (the test cluster runs on this machine)."""
    from ray.util.state import list_actors

    return [actor.pid for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if actor.name and actor.name.startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]


def _kill(pids: list[int]) -> int:
    """Each replica dies as in a crash: its process and its children (vLLM's engine core) get
    SIGKILL, which lands at once; ``ray.kill`` is a request to the GCS that can land seconds later,
    after the stream a test means to cut has finished."""
    import psutil

    for pid in pids:
        replica = psutil.Process(pid)
        for process in [*replica.children(recursive=True), replica]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    return len(pids)


def _wait_healthy(base_url) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline and _health(base_url).status_code != 200:
        time.sleep(3)
    assert _health(base_url).status_code == 200


def _stream_events(base_url, body, started: "threading.Event", out: list) -> None:
    """SSE data payloads, split on the blank line between events (generated text may hold U+2028)."""
    with httpx.Client(headers=auth(), timeout=300) as http:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
            buffer = b""
            for chunk in resp.iter_bytes():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out.append(event.decode("utf-8", "replace"))
                    started.set()


def test_engine_loss_before_first_token_fails_over_then_503_then_recovers(base_url, client, e2e_cluster):
    import threading

    config = e2e_cluster[0]

    # Both asked at once, right after the kill, while Serve is still replacing the killed replicas
    # (a replacement takes over 30 s to load; the router gives up on an engine after
    # first_response_timeout_s): dense also runs in the cloud, so its request moves there and the
    # client sees a normal answer; MoE runs only on-prem, so a clean 503 with Retry-After, not a
    # hang and not a 500.
    async def both():
        async with httpx.AsyncClient(headers=auth(), base_url=base_url, timeout=120) as http:
            dense_body = {"model": DENSE, "messages": HELLO, "max_tokens": 4, "stream": True}
            moe_body = {"model": MOE, "messages": HELLO, "max_tokens": 4}
            return await asyncio.gather(http.post("/v1/chat/completions", json=dense_body),
                                        http.post("/v1/chat/completions", json=moe_body))

    def failover_right_after_the_kill():
        started = time.monotonic()
        dense_resp, moe_resp = asyncio.run(both())
        assert dense_resp.status_code == 200 and dense_resp.headers["x-spillway-site"] == "cloud"
        chunks = [json.loads(e[6:]) for e in dense_resp.text.split("\n\n") if e.startswith("data: {")]
        assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] in {"stop", "length"}
        assert moe_resp.status_code == 503, moe_resp.text
        assert int(moe_resp.headers["retry-after"]) >= 1
        assert moe_resp.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - started < 60

    # A MoE stream is running when its engine dies: after the first token there is no failover,
    # and the client must get an explicit error event, never a silent truncation. The engines die
    # when the client has the stream's first event; a client reads behind its engine (that event
    # can come when much of a 1,900-token stream, about 3 s of work, is made), so the stream may be
    # whole before the kill lands: then the replacements are awaited and it is tried again.
    for attempt in range(3):
        moe_onprem = _replica_actors(config.name, "engine-spillway-moe-onprem")
        dense_onprem = _replica_actors(config.name, "engine-spillway-dense-onprem")
        events: list[str] = []
        started = threading.Event()
        body = {"model": MOE, "messages": HELLO, "max_tokens": 1900, "ignore_eos": True, "stream": True}
        streamer = threading.Thread(target=_stream_events, args=(base_url, body, started, events))
        streamer.start()
        assert started.wait(60)
        assert _kill(moe_onprem) == 1
        assert _kill(dense_onprem) == 1
        if attempt == 0:
            failover_right_after_the_kill()
        streamer.join(timeout=120)
        assert not streamer.is_alive()
        if events[-1] != "data: [DONE]":
            break
        _wait_healthy(base_url)
    else:
        pytest.fail("each stream was whole before its engine's kill landed; the test proves nothing")
    error = json.loads(events[-1][len("data: "):])["error"]
    assert error["type"] == "engine_error" and "incomplete" in error["message"]

    # /health says so meanwhile (or the replacement is already up).
    assert _health(base_url).status_code in {200, 503}

    # Serve replaces the dead replicas; the cluster heals without anyone's help.
    _wait_healthy(base_url)
    raw = client.chat.completions.with_raw_response.create(model=MOE, messages=HELLO, max_tokens=4)
    assert raw.headers["x-spillway-site"] == "onprem"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=HELLO)

    # The killed replicas never took their addresses off the direct-request list; their heartbeat
    # stopped, so the routers drop them from it: one live replica per deployment is left.
    from deployments.discovery import STALE_AFTER_S, list_gates

    engines = ("engine-spillway-moe-onprem", "engine-spillway-dense-onprem")
    deadline = time.monotonic() + STALE_AFTER_S + 30
    while time.monotonic() < deadline and any(len(list_gates(config.name, e)) != 1 for e in engines):
        time.sleep(1)
    assert {e: len(list_gates(config.name, e)) for e in engines} == {e: 1 for e in engines}


def test_redeploy_lets_in_flight_streams_finish(base_url, e2e_cluster):
    """Graceful shutdown: an engine removed by a new deployment finishes the streams it holds."""
    import threading

    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_config
    from serve_app.ops.deploy import wait_healthy

    config = e2e_cluster[0]
    result = {}

    def long_stream():
        with httpx.Client(headers=auth(), timeout=300) as http:
            body = {"model": DENSE, "messages": HELLO, "max_tokens": 1500, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
                result["site"] = resp.headers["x-spillway-site"]
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        result["done"] = events[-1] == "[DONE]"
        result["usage"] = json.loads(events[-2])["usage"]["completion_tokens"]

    from deployments.discovery import list_gates
    from serve_app.app import deployment_name

    onprem_engine = deployment_name(DENSE, "onprem")
    listed = list_gates(config.name, onprem_engine)
    assert len(listed) == 1, listed
    # The stream must go straight to the engine: a replica started moments ago (after the kill
    # test) can still be unknown to a router, and its request would then go through a Serve call,
    # which Serve drains before it stops the replica at all.
    router_dispatch_views(base_url, ready=lambda view: view["replicas"].get(onprem_engine) == [listed[0][0]])

    thread = threading.Thread(target=long_stream)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _health(base_url).json()["models"][DENSE]["onprem"].get("in_flight", 0) == 0:
        time.sleep(0.2)

    # Move dense off on-prem while the stream runs there: that engine deployment is deleted.
    raw = config.model_dump(mode="json")
    raw["models"][0]["replicas"] = {"cloud": 1}
    serve.run(build_app(load_config(raw)), name=config.name, route_prefix="/", blocking=False)
    thread.join(timeout=300)
    # The engine deployment was removed while (most likely, with 1,500 tokens) the stream ran, and
    # the stream still got every token.
    assert result == {"site": "onprem", "done": True, "usage": 1500}

    # Put the original deployment back for anything that runs after this test.
    serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
    wait_healthy(config)
