"""The response cache on the real cluster: two router replicas behind HAProxy, real engines."""

from __future__ import annotations

import secrets

import httpx
import pytest

from tests.conftest import admin_headers, e2e_api_key, router_dispatch_views

pytestmark = pytest.mark.e2e

DENSE = "spillway-dense"


def dispatched(base_url: str) -> int:
    """Requests the router replicas sent to engines, summed (each router counts its own, exactly)."""
    views = router_dispatch_views(base_url)
    return sum(v["direct_requests"] + v["serve_call_requests"] for v in views.values())


def engine_requests(base_url: str) -> int:
    """Requests the dense engines finished (each engine counts its own), once none is running."""
    import time

    deadline = time.monotonic() + 60
    while True:
        sites = httpx.get(f"{base_url}/health", timeout=30).json()["models"][DENSE]
        if all(s["in_flight"] == 0 for s in sites.values()) or time.monotonic() > deadline:
            return sum(s["releases"] for s in sites.values())
        time.sleep(0.2)


def test_a_hit_touches_no_engine_is_free_and_never_crosses_tenants(base_url):
    admin = f"{base_url}/v1/spillway/admin"
    other = httpx.post(f"{admin}/keys", json={"tenant": "cache-" + secrets.token_hex(3)}, headers=admin_headers(),
                       timeout=60).json()["key"]
    body = {"model": DENSE, "messages": [{"role": "user", "content": "cache " + secrets.token_hex(4)}],
            "max_tokens": 6, "temperature": 0}

    def ask(key: str, **extra) -> httpx.Response:
        return httpx.post(f"{base_url}/v1/chat/completions", json={**body, **extra},
                          headers={"authorization": f"Bearer {key}"}, timeout=120)

    # Each router replica has its own cache: fill both (HAProxy spreads connections by load).
    start, engines_start = dispatched(base_url), engine_requests(base_url)
    misses = hits = 0
    answers = []
    for _ in range(6):
        answer = ask(e2e_api_key())
        assert answer.status_code == 200
        answers.append(answer)
        misses += answer.headers["x-spillway-cache"] == "miss"
        hits += answer.headers["x-spillway-cache"] == "hit"
    assert hits >= 1 and misses <= 2 and misses + hits == 6
    assert dispatched(base_url) - start == misses  # the hits reached no engine: the routers' counters
    assert engine_requests(base_url) - engines_start == misses  # and the engines' own
    hit = next(a for a in answers if a.headers["x-spillway-cache"] == "hit")
    first = next(a for a in answers if a.headers["x-spillway-cache"] == "miss")
    assert hit.json()["choices"] == first.json()["choices"] and hit.headers["x-spillway-site"] == "cache"

    before = dispatched(base_url)
    elsewhere = ask(other)
    assert elsewhere.headers["x-spillway-cache"] == "miss" and dispatched(base_url) - before == 1

    # Streamed: served as a stream from the cache, same events.
    streams = [ask(e2e_api_key(), stream=True) for _ in range(4)]
    kinds = [s.headers["x-spillway-cache"] for s in streams]
    assert "hit" in kinds and all(s.headers["content-type"].startswith("text/event-stream") for s in streams)
    # A hit is the stream its router stored, byte for byte (each router's first one was a miss,
    # answered by the engine with its own id); every stream says the same at temperature 0.
    missed = {s.text for s in streams if s.headers["x-spillway-cache"] == "miss"}
    assert all(s.text in missed for s in streams if s.headers["x-spillway-cache"] == "hit")
    assert len({content(s.text) for s in streams}) == 1 and all(s.text.endswith("data: [DONE]\n\n") for s in streams)


def content(sse: str) -> str:
    import json

    text = ""
    for line in sse.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text
