"""End to end: OpenTelemetry span tree of one streamed request (router spans from the in-memory
exporter, vLLM's own span from the test's OTLP receiver), and Prometheus metrics moving after
traffic."""

from __future__ import annotations

import json
import secrets
import string
import time

import httpx
import pytest

from tests.conftest import E2E_METRICS_PORT, E2E_TENANT, auth, e2e_api_key, e2e_key_id

pytestmark = pytest.mark.e2e

DENSE = "spillway-dense"


def _router_spans(base_url: str, trace_id: str, want: set[str], timeout_s: float = 60) -> dict[str, dict]:
    """Spans of one trace, merged across router replicas (each GET reaches one of them)."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = httpx.get(f"{base_url}/v1/spillway/debug/spans", timeout=30).json()
        for span in reply["spans"]:
            if span["trace_id"] == trace_id:
                found[span["span_id"]] = span
        if want <= {s["name"] for s in found.values()}:
            break
        time.sleep(0.2)
    return found


def test_streamed_request_has_a_span_tree_with_attributes_and_no_prompt_text(base_url, otlp_receiver):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    # Letters only: random digits can form a number a PII detector matches (a BSN, a phone number).
    canary = "canary-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(12))
    body = {"model": DENSE, "messages": [{"role": "user", "content": f"repeat after me: {canary}"}],
            "max_tokens": 12, "ignore_eos": True, "stream": True}
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01", **auth()}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        text = resp.read().decode()
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    # The router asked the engine for usage (for metrics); the client did not, so it never sees it.
    assert not any('"usage":{' in e for e in events[:-1])

    spans = _router_spans(base_url, trace_id, {"spillway.request", "spillway.classify", "spillway.admission",
                                               "spillway.generate"})
    by_name = {s["name"]: s for s in spans.values()}
    root = by_name["spillway.request"]
    assert root["parent_span_id"] == client_span  # the incoming traceparent is honoured
    assert root["kind"] == "SERVER"
    for child in ("spillway.classify", "spillway.admission", "spillway.generate"):
        assert by_name[child]["parent_span_id"] == root["span_id"], child
    attrs = root["attributes"]
    assert attrs["spillway.model"] == DENSE
    # The key's tenant and id, never the key itself.
    assert attrs["spillway.tenant"] == E2E_TENANT and attrs["spillway.key_id"] == e2e_key_id()
    assert e2e_api_key() not in json.dumps(spans)
    assert attrs["spillway.data_class"] == "public"
    assert attrs["spillway.site"] == "onprem"
    assert attrs["spillway.replica"]
    assert attrs["spillway.queue_wait_ms"] >= 0
    assert attrs["spillway.spill_reason"] == "none"
    assert 0 < attrs["spillway.ttft_ms"] < 60_000
    assert attrs["spillway.output_tokens"] == 12 and attrs["spillway.input_tokens"] > len(canary)
    assert attrs["spillway.outcome"] == "ok"
    assert by_name["spillway.admission"]["attributes"]["spillway.site"] == "onprem"
    assert by_name["spillway.generate"]["attributes"]["spillway.replica"] == attrs["spillway.replica"]
    assert by_name["spillway.classify"]["attributes"]["spillway.data_class"] == "public"
    # No prompt text anywhere (record_content is off).
    assert canary not in json.dumps(spans)

    # vLLM's own request span joins the trace under the router's generation span.
    generate_id = by_name["spillway.generate"]["span_id"]
    deadline = time.monotonic() + 60
    engine_spans = []
    while time.monotonic() < deadline and not engine_spans:
        engine_spans = [s for s in otlp_receiver.spans_of(trace_id) if s["parent_span_id"] == generate_id]
        time.sleep(0.5)
    assert engine_spans, otlp_receiver.spans_of(trace_id)


def test_pii_request_span_says_which_detector_raised_the_class(base_url):
    trace_id = secrets.token_hex(16)
    body = {"model": DENSE, "max_tokens": 2,
            "messages": [{"role": "user", "content": "mail me at jane.doe@example.com"}]}
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", **auth()}
    assert httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120).status_code == 200
    spans = _router_spans(base_url, trace_id, {"spillway.request", "spillway.classify"})
    by_name = {s["name"]: s for s in spans.values()}
    assert by_name["spillway.classify"]["attributes"]["spillway.raised_by"] == ["email"]
    assert by_name["spillway.request"]["attributes"]["spillway.data_class"] == "confidential"
    assert "jane.doe" not in json.dumps(spans)


def _scrape() -> dict[str, float]:
    """Sum of every ray_spillway_* series, keyed by metric line without its value."""
    text = httpx.get(f"http://127.0.0.1:{E2E_METRICS_PORT}/metrics", timeout=30).text
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_spillway_"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


def _total(series: dict[str, float], name: str, *labels: str) -> float:
    return sum(v for k, v in series.items()
               if (k.startswith(name + "{") or k == name) and all(label in k for label in labels))


def test_prometheus_metrics_move_after_traffic(base_url):
    watched = {
        "ttft": ("ray_spillway_ttft_ms_count", f'model="{DENSE}"', 'site="onprem"'),
        "itl": ("ray_spillway_itl_ms_count", f'model="{DENSE}"'),
        "tokens_in": ("ray_spillway_tokens_total", f'model="{DENSE}"', 'direction="in"'),
        "tokens_out": ("ray_spillway_tokens_total", f'model="{DENSE}"', 'direction="out"'),
        "cost": ("ray_spillway_cost_total", f'model="{DENSE}"', 'site="onprem"'),
        "requests": ("ray_spillway_requests_total", f'model="{DENSE}"', 'outcome="ok"'),
        "queue_wait": ("ray_spillway_queue_wait_ms_count", f'model="{DENSE}"'),
    }
    before = _scrape()
    with httpx.Client(headers=auth(), base_url=base_url, timeout=120) as http:
        for i in range(4):
            body = {"model": DENSE, "messages": [{"role": "user", "content": f"metrics {i}"}], "max_tokens": 8,
                    "ignore_eos": True, "stream": i % 2 == 0}
            assert http.post("/v1/chat/completions", json=body).status_code == 200
    # Ray exports application metrics on an interval, per router replica (the four requests went
    # through both): wait until every series moved by all four requests, not only by some.
    def settled(moved):
        return all(v > 0 for v in moved.values()) and moved["tokens_out"] >= 4 * 8 and moved["requests"] >= 4

    deadline = time.monotonic() + 120
    while True:
        after = _scrape()
        moved = {k: _total(after, *spec) - _total(before, *spec) for k, spec in watched.items()}
        if settled(moved) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert settled(moved), moved
    # The engine's KV-cache use and the queue depth are polled gauges, present for every model.
    assert _total(after, "ray_spillway_engine_kv_cache_usage", f'model="{DENSE}"', 'site="onprem"') >= 0
    assert any(k.startswith("ray_spillway_engine_kv_cache_usage{") and "spillway-moe" in k for k in after)
    assert any(k.startswith("ray_spillway_queue_depth{") for k in after)
