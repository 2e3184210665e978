"""End to end: the official `openai` SDK over HTTP against a real two-site Ray cluster running
real vLLM engines (dense Llama-style and MoE Mixtral-style generated models)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import E2E_CENTRAL, auth, router_dispatch_views

pytestmark = pytest.mark.e2e

DENSE, MOE, EMBED = "spillway-dense", "spillway-moe", "all-minilm-l6-v2"
HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_models_list(client):
    raw = client.models.with_raw_response.list()
    assert raw.headers["x-spillway-site"] == "onprem" and raw.headers["x-request-id"]
    ids = {m.id for m in raw.parse().data}
    # three local models, one on the external site, one split alias, two semantic aliases
    assert ids == {DENSE, MOE, EMBED, E2E_CENTRAL, "spillway-chat", "auto", "auto-strict"}
    assert client.models.retrieve(MOE).id == MOE


@pytest.mark.parametrize("model", [DENSE, MOE])
def test_chat_non_stream_on_both_models(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=12)
    completion = raw.parse()
    assert raw.headers["x-spillway-site"] == "onprem"
    assert raw.headers["x-request-id"]
    assert completion.model == model
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 0


@pytest.mark.parametrize("model", [DENSE, MOE])
def test_chat_stream_on_both_models_with_usage_in_last_chunk(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=HELLO, max_tokens=16, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert raw.headers["x-spillway-site"] == "onprem"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len(text) > 0
    assert len({c.id for c in chunks}) == 1


def test_request_id_from_client_is_kept(base_url):
    resp = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": DENSE, "messages": HELLO, "max_tokens": 2},
        headers={"x-request-id": "my-trace-123", **auth()},
        timeout=60,
    )
    assert resp.status_code == 200
    assert resp.headers.get_list("x-request-id") == ["my-trace-123"]
    assert resp.json()["id"] == "chatcmpl-my-trace-123"


def test_completions_endpoint_with_logprobs_and_n(client):
    raw = client.completions.with_raw_response.create(model=DENSE, prompt="Once upon", max_tokens=5, n=2, logprobs=2)
    completion = raw.parse()
    assert raw.headers["x-spillway-site"] == "onprem"
    assert len(completion.choices) == 2
    assert all(len(c.logprobs.tokens) == 5 for c in completion.choices)
    stream = list(client.completions.create(model=MOE, prompt="abc", max_tokens=4, stream=True))
    assert stream[-1].choices[0].finish_reason in {"stop", "length"}


def test_chat_n_stop_and_logprobs(client):
    completion = client.chat.completions.create(
        model=DENSE, messages=HELLO, max_tokens=8, n=3, logprobs=True, top_logprobs=2, stop=["\n"], seed=3
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert "\n" not in choice.message.content
        assert len(choice.logprobs.content[0].top_logprobs) == 2


def test_seeded_sampling_is_reproducible(client):
    def sample(seed, user):  # a different `user` each time: the engine answers, not the response cache
        return client.chat.completions.create(
            model=MOE, messages=HELLO, max_tokens=24, temperature=1.0, seed=seed, user=user,
            extra_body={"ignore_eos": True}).choices[0].message.content

    first, second, other = sample(42, "a"), sample(42, "b"), sample(7, "c")
    assert first == second
    assert first != other


def test_tools_named_choice_is_parsed_into_tool_calls(client):
    completion = client.chat.completions.create(
        model=DENSE,
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=160,  # one byte per token: the forced envelope alone is about 60 tokens
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in {"Paris", "Berlin", "Rome"}


def test_tools_auto_and_tool_messages_are_accepted(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    for model in (DENSE, MOE):
        completion = client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=8
        )
        assert completion.choices[0].finish_reason in {"stop", "length", "tool_calls"}


def test_json_mode_returns_json(client):
    completion = client.chat.completions.create(
        model=DENSE, messages=[{"role": "user", "content": "Reply in JSON"}],
        response_format={"type": "json_object"}, max_tokens=64,
    )
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content), dict)
    else:  # the random model may run out of tokens inside the object; it must still be JSON so far
        assert completion.choices[0].message.content.lstrip().startswith("{")


def test_32_concurrent_streams_all_complete(aclient):
    async def one(i):
        stream = await aclient.chat.completions.create(
            model=DENSE if i % 2 else MOE, messages=[{"role": "user", "content": f"stream {i}"}],
            max_tokens=24, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        deltas, finish, usage = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                deltas += bool(chunk.choices[0].delta.content)
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return deltas, finish, usage.completion_tokens if usage else None

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    # Every stream ran to its token budget with content. vLLM merges the deltas its output consumer
    # has not taken yet into one, so a stream whose engine replica was starved of CPU (32 streams on
    # 2 cores) may arrive in a single delta; most must still really stream (several deltas).
    assert all(finish == "length" and tokens == 24 and deltas >= 1 for deltas, finish, tokens in results), results
    assert sum(deltas >= 2 for deltas, _, _ in results) >= 24, results


def test_requests_go_straight_to_engine_replicas_not_through_ray_calls(base_url, client):
    before = router_dispatch_views(base_url)
    for view in before.values():
        assert set(view["replicas"]) == {"engine-spillway-dense-onprem", "engine-spillway-dense-cloud",
                                         "engine-spillway-moe-onprem", "engine-all-minilm-l6-v2-onprem"}
        # Every node of the local cluster runs on this machine: each replica over its Unix socket.
        assert view["local_socket"] == view["replicas"], view
    for i in range(3):
        client.chat.completions.create(model=MOE, messages=HELLO, max_tokens=2)
        chunks = list(client.chat.completions.create(model=DENSE, messages=HELLO, max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    after = router_dispatch_views(base_url)
    direct = sum(after[r]["direct_requests"] - before[r]["direct_requests"] for r in after)
    fallback = sum(after[r]["serve_call_requests"] - before[r]["serve_call_requests"] for r in after)
    assert (direct, fallback) == (6, 0)
    # The default listener splices every stream from the engine's socket to the client's.
    spliced = sum(after[r]["streams"]["spliced"] - before[r]["streams"]["spliced"] for r in after)
    relayed = sum(after[r]["streams"]["relayed"] - before[r]["streams"]["relayed"] for r in after)
    assert (spliced, relayed) == (3, 0)


def _engine_stats(base_url, model, site="onprem"):
    return httpx.get(f"{base_url}/health", timeout=30).json()["models"][model][site]


def test_client_disconnect_mid_stream_frees_the_engine(base_url, client):
    # The stream's site is known only from its headers, so read both sites' counters first, once
    # nothing else runs there (nothing else can then be aborted while this test watches).
    deadline = time.monotonic() + 30
    while True:
        before = {site: _engine_stats(base_url, DENSE, site) for site in ("onprem", "cloud")}
        if all(s["in_flight"] == 0 for s in before.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(s["in_flight"] == 0 for s in before.values()), before
    aborted_before = {site: s["aborted_streams"] for site, s in before.items()}
    with httpx.Client(headers=auth(), timeout=60) as http:
        with http.stream(
            "POST", f"{base_url}/v1/chat/completions",
            json={"model": DENSE, "messages": HELLO, "max_tokens": 1500, "stream": True, "ignore_eos": True},
        ) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            site = resp.headers["x-spillway-site"]
        # Leaving the block closes the connection a few tokens into a 1,500-token stream.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _engine_stats(base_url, DENSE, site)["in_flight"] > 0:
        time.sleep(0.5)
    stats = _engine_stats(base_url, DENSE, site)
    assert stats["in_flight"] == 0, stats
    # Freed because it was aborted, not because it ran to its end: the engine counts it cut short.
    assert stats["aborted_streams"] == aborted_before[site] + 1, stats
    assert stats["healthy"]
    completion = client.chat.completions.create(model=DENSE, messages=HELLO, max_tokens=4)
    assert completion.choices[0].message.content is not None


def test_health_reports_every_engine_with_live_load(base_url):
    report = httpx.get(f"{base_url}/health", timeout=30).json()
    assert report["status"] == "ok"
    assert set(report["models"][DENSE]) == {"onprem", "cloud"}
    external = report["models"][E2E_CENTRAL]["api"]
    assert {k: external[k] for k in ("healthy", "kind", "model", "site", "max_concurrency")} == {
        "healthy": True, "kind": "external", "model": E2E_CENTRAL, "site": "api", "max_concurrency": 8}
    for model, sites in report["models"].items():
        if model == E2E_CENTRAL:
            continue  # an external API reports no engine figures
        for site, stats in sites.items():
            assert stats["healthy"] and stats["site"] == site and stats["model"] == model
            assert stats["max_num_seqs"] == (8 if model == DENSE else 32)
            assert {"running", "waiting", "kv_cache_usage"} <= set(stats)
