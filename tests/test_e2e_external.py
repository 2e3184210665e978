"""An external API site against real vLLM OpenAI servers on loopback (``vllm serve``), through
Spillway's router over HTTP with the official ``openai`` SDK. No Ray: an external site needs none.

- ``api``: a vLLM server behind a TCP proxy that records what reached it and can cut a response;
- ``api-down``: a port where nothing listens (a site that fails before the first byte);
- ``api-b``: a second vLLM server, killed during a stream.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from deployments.model_prep import prepare_model
from serve_app.config import SpillwayConfig
from tests.test_request_path import RecordingMetrics
from tests.vllm_server import TcpProxy, VllmServer, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REMOTE_NAME = "central-llm"
API_KEY_ENV = "SPILLWAY_TEST_EXTERNAL_KEY"


def _config(proxy_url: str, down_url: str, b_url: str) -> SpillwayConfig:
    endpoint = {"api_key_env": API_KEY_ENV, "models": {"central": REMOTE_NAME, "central-failover": REMOTE_NAME,
                                                        "central-b": REMOTE_NAME},
                "retries": 1, "retry_backoff_s": 0.05, "first_byte_timeout_s": 60, "connect_timeout_s": 2}
    api = {"basis": "api", "input_per_million": 2.5, "output_per_million": 10.0}
    return SpillwayConfig.model_validate({
        "sites": [
            {"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
            {"name": "api-down", "kind": "external", "preference": 1, "cost": api,
             "external": {**endpoint, "base_url": down_url}},
            {"name": "api", "kind": "external", "preference": 2, "cost": api,
             "external": {**endpoint, "base_url": proxy_url, "max_concurrency": 4}},
            {"name": "api-b", "kind": "external", "preference": 3, "cost": api,
             "external": {**endpoint, "base_url": b_url}},
        ],
        "models": [
            {"id": "central", "replicas": {"api": 1}},
            {"id": "central-failover", "replicas": {"api-down": 1, "api": 1}},
            {"id": "central-b", "replicas": {"api-b": 1}},
        ],
        "router": {"direct_dispatch": False, "replica_cooldown_s": 2, "load_poll_interval_ms": 500},
    })


class RouterServer:
    """Spillway's HTTP API (the router's routes and pipeline) on a loopback port, in a thread."""

    def __init__(self, config: SpillwayConfig):
        self.config, self.port = config, free_port()
        self.gateway = None
        self._ready = threading.Event()

    def start(self) -> "RouterServer":
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(30)
        return self

    def _run(self) -> None:
        import uvicorn

        from serve_app.http.routes import build_api
        from serve_app.pipeline.gateway import Gateway

        self.gateway = Gateway(self.config, {}, metrics=RecordingMetrics())
        self.server = uvicorn.Server(uvicorn.Config(build_api(self.gateway), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        loop = asyncio.new_event_loop()
        loop.call_later(0.5, self._ready.set)
        loop.run_until_complete(self.server.serve())

    def stop(self) -> None:
        self.server.should_exit = True


@pytest.fixture(scope="module")
def external(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("external")
    model_path = str(prepare_model("dense"))
    server = VllmServer(model_path, REMOTE_NAME, free_port(), root / "vllm-a.log").start()
    server_b = VllmServer(model_path, REMOTE_NAME, free_port(), root / "vllm-b.log").start()
    proxy = TcpProxy(server.port).start()
    monkeypatch_module.setenv(API_KEY_ENV, "sk-test-external")
    try:
        server.wait_ready()
        server_b.wait_ready()
        router = RouterServer(_config(proxy.base_url, f"http://127.0.0.1:{free_port()}/v1", server_b.base_url)).start()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{router.port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        yield client, proxy, server_b
        router.stop()
    finally:
        proxy.stop()
        server.stop()
        server_b.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _tokens_before_the_error(stream, kill_after: tuple[int, VllmServer] | None = None) -> int:
    """Content chunks read before the stream's explicit error event (which the SDK raises); with
    ``kill_after``, that server is killed once that many arrived."""
    received = 0
    with pytest.raises(openai.APIError, match="failed while streaming"):
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if kill_after is not None and received == kill_after[0]:
                kill_after[1].kill()
    return received


def test_chat_and_streams_pass_through_with_the_apis_model_name_and_key(external):
    client, proxy, _ = external
    raw = client.chat.completions.with_raw_response.create(model="central", messages=_chat("Hello there"), max_tokens=8)
    answer = raw.parse()
    assert raw.headers["x-spillway-site"] == "api" and answer.usage.completion_tokens > 0
    assert proxy.seen(f'"model":"{REMOTE_NAME}"'.encode()) and proxy.seen(b"Bearer sk-test-external")
    chunks = list(client.chat.completions.create(model="central", messages=_chat("Count to ten"), max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    # a request error of the API's own (here: too many tokens for its context) is passed on as it came
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="central", messages=_chat("hi"), max_tokens=100_000)


def test_a_site_down_before_the_first_byte_fails_over_to_the_next_site(external):
    client, _, _ = external
    raw = client.chat.completions.with_raw_response.create(model="central-failover", messages=_chat("Hi"), max_tokens=4)
    assert raw.headers["x-spillway-site"] == "api"  # api-down (preferred) refused the connection twice


def test_a_stream_cut_midway_ends_with_an_error_event_not_a_silent_truncation(external):
    client, proxy, _ = external
    proxy.cut_after_bytes = 2_000  # past the headers and the first events, long before the end
    try:
        stream = client.chat.completions.create(model="central", messages=_chat("Tell me a long story"),
                                                max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        assert _tokens_before_the_error(stream) >= 1
    finally:
        proxy.cut_after_bytes = None
    assert client.chat.completions.create(model="central", messages=_chat("Hi"), max_tokens=4).choices


def test_a_server_killed_during_a_stream_then_answers_503_in_openais_format(external):
    client, _, server_b = external
    stream = client.chat.completions.create(model="central-b", messages=_chat("Tell me a long story"),
                                            max_tokens=1_500, stream=True, extra_body={"ignore_eos": True})
    assert _tokens_before_the_error(stream, kill_after=(3, server_b)) >= 3
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="central-b", messages=_chat("Hi"), max_tokens=4)
    assert refused.value.status_code == 503 and refused.value.body["code"] in ("engine_unavailable", "service_unavailable")
    assert time.monotonic() - started < 30


def test_confidential_data_never_reaches_an_external_site(external):
    client, proxy, _ = external
    marker = "jane.marker.doe@example.com"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="central", messages=_chat(f"Write to {marker} about the invoice"),
                                       max_tokens=4)
    assert refused.value.body["code"] == "residency_violation"
    assert not proxy.seen(marker.encode())
