"""End to end: the router's admission and spill-over on the real cluster. On-prem first at low load;
when on-prem dense (8 slots in the test config) is saturated, public requests spill to the cloud
site while confidential ones (by header and by detected PII) stay on-prem."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import E2E_DENSE_SLOTS, auth

pytestmark = pytest.mark.e2e

DENSE = "spillway-dense"


def test_low_load_is_all_on_prem(client):
    for i in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=DENSE, messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=4
        )
        assert raw.headers["x-spillway-site"] == "onprem"
        assert raw.headers["x-spillway-spill-reason"] == "none"
        assert raw.headers["x-spillway-data-class"] == "public"
        assert float(raw.headers["x-spillway-queue-ms"]) >= 0


def test_saturation_spills_public_and_keeps_confidential_on_prem(base_url):
    async def one(http, kind, i):
        headers = {}
        content = f"request {i}"
        if kind == "header":
            headers["x-data-classification"] = "confidential"
        elif kind == "pii":
            content = f"my IBAN is DE89 3704 0044 0532 0130 00, request {i}"
        body = {"model": DENSE, "messages": [{"role": "user", "content": content}], "max_tokens": 96,
                "ignore_eos": True, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200, await resp.aread()
            events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            return kind, resp.headers["x-spillway-site"], resp.headers["x-spillway-data-class"], resp.headers["x-spillway-spill-reason"]

    async def main():
        async with httpx.AsyncClient(headers=auth(), base_url=base_url, timeout=300) as http:
            kinds = ["public"] * (3 * E2E_DENSE_SLOTS) + ["header"] * 6 + ["pii"] * 6
            return await asyncio.gather(*(one(http, kind, i) for i, kind in enumerate(kinds)))

    results = asyncio.run(main())
    public_sites = [site for kind, site, _, _ in results if kind == "public"]
    sensitive = [(site, data_class) for kind, site, data_class, _ in results if kind != "public"]
    # Residency: zero violations, by header and by detected PII.
    assert sensitive and all(site == "onprem" and data_class == "confidential" for site, data_class in sensitive)
    # Spill-over: on-prem could not hold the burst, public traffic used the cloud site too.
    assert public_sites.count("cloud") > 0 and public_sites.count("onprem") > 0
    assert all(reason == "onprem_wait_over_budget" for kind, site, _, reason in results if site == "cloud")


def test_prometheus_metrics_show_requests_and_spills(base_url):
    """Scrapes the head node's Ray metrics endpoint (the router runs there) after the burst above."""
    import time

    from tests.conftest import E2E_METRICS_PORT

    def series(text):
        lines = [line for line in text.splitlines() if line.startswith("ray_spillway_")]
        spills = [line for line in lines if 'reason="onprem_wait_over_budget"' in line and DENSE in line]
        ok_cloud = [line for line in lines if line.startswith("ray_spillway_requests_total")
                    and 'site="cloud"' in line and 'outcome="ok"' in line]
        return lines, spills, ok_cloud

    # Each router replica's series reach the exporter on their own schedule: wait for the ones asserted.
    deadline = time.monotonic() + 120
    while True:
        lines, spills, ok_cloud = series(httpx.get(f"http://127.0.0.1:{E2E_METRICS_PORT}/metrics", timeout=30).text)
        if (spills and ok_cloud) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert spills, lines[:20]
    assert ok_cloud and float(ok_cloud[0].rsplit(" ", 1)[1]) > 0
    assert any(line.startswith("ray_spillway_queue_wait_ms_bucket") for line in lines)
    assert not any("IBAN" in line or "DE89" in line for line in lines)  # no prompt text in metrics


def test_bad_classification_and_priority_headers_are_400(base_url):
    with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as http:
        body = {"model": DENSE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        bad_class = http.post("/v1/chat/completions", json=body, headers={"x-data-classification": "top-secret"})
        assert bad_class.status_code == 400 and "x-data-classification" in bad_class.json()["error"]["message"]
        bad_prio = http.post("/v1/chat/completions", json=body, headers={"x-spillway-priority": "urgent"})
        assert bad_prio.status_code == 400 and bad_prio.json()["error"]["param"] == "x-spillway-priority"
        ok = http.post("/v1/chat/completions", json=body, headers={"x-spillway-priority": "5", "x-data-classification": "restricted"})
        assert ok.status_code == 200 and ok.headers["x-spillway-site"] == "onprem"
        assert ok.headers["x-spillway-data-class"] == "restricted"


def test_split_alias_follows_weights_and_sticks_per_user(client, base_url):
    counts = {"spillway-dense": 0, "spillway-moe": 0}
    for i in range(120):
        raw = client.chat.completions.with_raw_response.create(
            model="spillway-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1, user=f"user-{i}"
        )
        variant = raw.headers["x-spillway-variant"]
        assert raw.parse().model == variant
        counts[variant] += 1
    share_dense = counts["spillway-dense"] / 120
    assert 0.55 <= share_dense <= 0.85, counts  # 70 % configured
    for user in ("user-3", "user-77"):
        seen = {client.chat.completions.with_raw_response.create(
            model="spillway-chat", messages=[{"role": "user", "content": "again"}], max_tokens=1, user=user
        ).headers["x-spillway-variant"] for _ in range(4)}
        assert len(seen) == 1
    # Counters are per router replica (the test cluster runs two): collect each replica's report once.
    per_replica = {}
    for _ in range(40):
        report = httpx.get(f"{base_url}/v1/spillway/splits", timeout=30).json()
        per_replica[report["router_replica"]] = report["splits"]["spillway-chat"]
        if len(per_replica) == 2:
            break
    assert len(per_replica) == 2
    total = {v: sum(r[v]["requests"] for r in per_replica.values()) for v in ("spillway-dense", "spillway-moe")}
    assert sum(total.values()) == 128
    for report in per_replica.values():
        dense = report["spillway-dense"]
        assert dense["errors"] == 0 and dense["output_tokens"] == dense["requests"]
        assert dense["requests"] == 0 or dense["mean_ttft_ms"] > 0


def test_benchmark_baseline_modes_route_as_documented(base_url):
    """The routing benchmark's baselines: pow2 spreads over both sites (it ignores residency, which is
    why it exists only behind router.benchmark_modes), onprem-only never leaves on-prem."""
    body = {"model": DENSE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as http:
        pow2_sites = set()
        for _ in range(30):
            resp = http.post("/v1/chat/completions", json=body, headers={"x-spillway-routing": "pow2"})
            assert resp.status_code == 200
            assert resp.headers["x-spillway-spill-reason"] == "pow2"
            pow2_sites.add(resp.headers["x-spillway-site"])
        assert pow2_sites == {"onprem", "cloud"}
        for _ in range(5):
            resp = http.post("/v1/chat/completions", json=body, headers={"x-spillway-routing": "onprem-only"})
            assert resp.status_code == 200 and resp.headers["x-spillway-site"] == "onprem"
