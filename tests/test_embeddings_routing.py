"""Embeddings, semantic routing and external sites without Ray: the shape of an embeddings body,
the text that routing embeds, the routing decision over given vectors, the semantic route stage
with a FAKE embedder (residency, fallback, degraded routing), the config checks, and the external
transport against a FAKE upstream (an aiohttp server in the test: retries, pass-through, keys)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest
from aiohttp import web

from serve_app.config import ModelConfig, SiteConfig, SpillwayConfig, load_config
from serve_app.errors import ConfigError, InvalidRequest, ModelNotAllowed
from serve_app.observe.tracing import NO_TRACE
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.resolve import ResolveStage
from serve_app.pipeline.route import SemanticStage
from serve_app.pipeline.scan import ScanSpec, result_from_wire, result_to_wire, scan_request
from serve_app.pipeline.schema import ShapeLimits, sequences_of
from serve_app.policy.classify import Classification, DataClass
from serve_app.policy.semantic import SemanticRouter
from serve_app.transport.base import EngineRequest, TransportError
from serve_app.transport.external import ExternalTransport

SPEC = ScanSpec(ShapeLimits(max_embedding_inputs=4), route_chars=40)


def scan(body: dict, endpoint: str = "embeddings"):
    return scan_request(json.dumps(body).encode(), endpoint, SPEC)


# ---- the shape of an embeddings body -------------------------------------------------------------

@pytest.mark.parametrize("value, inputs, opaque", [
    ("a sentence", 1, ()),
    (["one", "two", "three"], 3, ()),
    ([101, 2023, 102], 1, ("token_ids",)),
    ([[101, 102], [101, 7, 102]], 2, ("token_ids",)),
])
def test_embedding_inputs_in_openais_forms(value, inputs, opaque):
    result = scan({"model": "e", "input": value})
    assert result.status == 200 and result.shape.prompts == inputs and result.shape.opaque == opaque
    assert result.shape.max_tokens == 1 and not result.shape.stream


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "empty array"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["a", ""]}, "input", "empty strings"),
    ({"input": ["a", 1]}, "input", "must be a string"),
    ({"input": [[1], []]}, "input", "empty strings or arrays"),
    ({"input": [[1], "a"]}, "input", "must be a string"),
    ({}, "input", "required"),
    ({"input": ["x"] * 5}, "input", "at most 4"),
    ({"input": "x", "encoding_format": "bytes"}, "encoding_format", "float, base64"),
    ({"input": "x", "dimensions": 0}, "dimensions", "at least 1"),
    ({"input": "x", "dimensions": "8"}, "dimensions", "integer"),
    ({"input": "x", "stream": True}, "stream", "cannot be streamed"),
])
def test_bad_embedding_bodies_are_400_naming_the_parameter(body, param, words):
    result = scan({"model": "e", **body})
    assert result.status == 400 and result.param == param and words in result.message


def test_an_embedding_request_counts_one_sequence_per_input_up_to_the_engines_batch():
    assert sequences_of("embeddings", {"input": ["a"] * 50}, max_num_seqs=32) == 32
    assert sequences_of("embeddings", {"input": ["a"] * 3}, max_num_seqs=32) == 3
    assert sequences_of("embeddings", {"input": [1, 2, 3]}, max_num_seqs=32) == 1


MODELS = {"chat": ModelConfig(id="chat", source="builtin:dense", replicas={"onprem": 1}, engine={"max_num_seqs": 4}),
          "embed": ModelConfig(id="embed", source="builtin:minilm", replicas={"onprem": 1},
                               engine={"runner": "pooling", "max_num_seqs": 4})}


def _context(body: dict, endpoint: str, data_class=DataClass.public) -> RequestContext:
    ctx = RequestContext(endpoint, RequestHeaders("r1"), NO_TRACE)
    ctx.scan = scan_request(json.dumps(body).encode(), endpoint, SPEC)
    ctx.classification = Classification(data_class, DataClass.public)
    return ctx


def test_resolve_keeps_embedding_and_chat_models_to_their_endpoints():
    async def main():
        stage = ResolveStage(MODELS, {})
        ctx = _context({"model": "embed", "input": ["a", "b", "c"]}, "embeddings")
        await stage.run(ctx)
        assert ctx.model == "embed" and ctx.sequences == 3
        with pytest.raises(InvalidRequest, match="not an embedding model") as info:
            await stage.run(_context({"model": "chat", "input": "a"}, "embeddings"))
        assert info.value.param == "model"
        with pytest.raises(InvalidRequest, match="is an embedding model: use /v1/embeddings"):
            await stage.run(_context({"model": "embed", "messages": [{"role": "user", "content": "hi"}]}, "chat"))

    asyncio.run(main())


# ---- what routing embeds -------------------------------------------------------------------------

def test_routing_embeds_the_end_of_the_last_user_message_and_it_survives_the_helper_wire():
    chat = scan({"model": "auto", "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "x" * 100}, {"type": "text", "text": "the real ask"}]},
    ]}, "chat")
    assert chat.route_text == ("x" * 100 + "\nthe real ask")[-40:]
    assert result_from_wire(result_to_wire(chat)).route_text == chat.route_text
    assert scan({"model": "auto", "prompt": "complete this"}, "completions").route_text == "complete this"
    assert scan({"model": "auto", "prompt": [1, 2, 3]}, "completions").route_text is None
    assert scan_request(b'{"model": "m", "prompt": "p"}', "completions", ScanSpec()).route_text is None  # off


# ---- the routing decision ------------------------------------------------------------------------

ROUTES = {"embedding_model": "embed", "default": "general", "threshold": 0.5, "targets": {
    "legal": {"model": "chat", "description": "law", "examples": ["contract", "lawsuit"]},
    "code": {"model": "chat", "description": "code", "examples": ["python"]},
    "general": {"model": "central", "description": "anything", "confidential_fallback": "chat"},
}}
# One direction per anchor, in anchor order: legal x3, code x2, general x1.
ANCHOR_VECTORS = {"law": [1, 0, 0, 0], "contract": [0.9, 0.1, 0, 0], "lawsuit": [0.95, 0, 0.05, 0],
                  "code": [0, 1, 0, 0], "python": [0, 0.9, 0.1, 0], "anything": [0, 0, 0, 1]}


def _router() -> SemanticRouter:
    config = _semantic_config().router.semantic_routes["auto"]
    router = SemanticRouter("auto", config)
    router.set_anchor_vectors([ANCHOR_VECTORS[text] for text in router.anchor_texts()])
    return router


def test_the_best_anchor_of_each_target_decides_and_below_the_threshold_the_default_takes_it():
    router = _router()
    choice = router.choose([0.2, 0.9, 0.1, 0])  # near "python"
    assert (choice.target, choice.model, choice.reason) == ("code", "chat", "match") and choice.score > 0.9
    scores = router.scores([0.9, 0.1, 0, 0])
    assert scores["legal"] == pytest.approx(1.0, abs=1e-6) and scores["legal"] > scores["code"] > scores["general"]
    vague = router.choose([0.3, 0.3, 0.9, 0.0])  # like no anchor of any target
    assert vague.target == "general" and vague.reason == "below_threshold" and vague.score < 0.5
    with pytest.raises(ValueError, match="anchor vectors"):
        router.set_anchor_vectors([[1, 0, 0, 0]])


class FakeEmbedder:
    """A FAKE embedding model: fixed vectors per text, or a failure; records what it was asked."""

    def __init__(self, vectors: dict[str, list[float]], fail: bool = False):
        self.vectors, self.fail, self.calls = vectors, fail, []

    async def embed(self, model_id, texts, classification, *, onprem_only=False, priority=0):
        self.calls.append((texts, classification.data_class))
        if self.fail:
            raise TimeoutError("embedding engine too slow")
        return np.array([self.vectors[text] for text in texts], dtype=np.float32)


def _semantic_config(**route_overrides) -> SpillwayConfig:
    routes = json.loads(json.dumps(ROUTES))
    routes.update(route_overrides)
    return SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "api", "kind": "external", "preference": 2,
                   "external": {"base_url": "http://127.0.0.1:9/v1"}}],
        "models": [{"id": "chat", "source": "builtin:dense", "replicas": {"onprem": 1}},
                   {"id": "embed", "source": "builtin:minilm", "replicas": {"onprem": 1},
                    "engine": {"runner": "pooling"}},
                   {"id": "central", "replicas": {"api": 1}}],
        "router": {"semantic_routes": {"auto": routes}},
    })


class Metrics:
    def __init__(self):
        self.routes = []

    def semantic_route(self, *args):
        self.routes.append(args)


def _route(stage: SemanticStage, prompt: str | None, data_class=DataClass.public, endpoint="chat") -> RequestContext:
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]} if prompt is not None else \
        {"model": "auto", "prompt": [1, 2, 3]}
    if endpoint == "embeddings":
        body = {"model": "auto", "input": "x"}
    ctx = _context(body, endpoint if prompt is not None else "completions", data_class)
    asyncio.run(_warm_and_run(stage, ctx))
    return ctx


async def _warm_and_run(stage: SemanticStage, ctx: RequestContext) -> None:
    await stage.warm()
    await stage.run(ctx)


def _stage(vectors=None, fail=False, **overrides) -> tuple[SemanticStage, FakeEmbedder, Metrics]:
    embedder = FakeEmbedder({**ANCHOR_VECTORS, **(vectors or {})}, fail)
    metrics = Metrics()
    return SemanticStage(_semantic_config(**overrides), embedder, metrics), embedder, metrics


def test_the_stage_routes_by_meaning_and_records_the_choice():
    stage, embedder, metrics = _stage({"sue them": [1, 0.1, 0, 0]})
    ctx = _route(stage, "sue them")
    assert (ctx.route.target, ctx.route.model, ctx.route.reason) == ("legal", "chat", "match")
    assert embedder.calls[0][1] == DataClass.public  # anchors: config text
    assert embedder.calls[-1] == (["sue them"], DataClass.public)  # the prompt, under its own class
    assert metrics.routes[-1][:3] == ("auto", "legal", "match")
    resolve = ResolveStage({m.id: m for m in _semantic_config().models}, {})
    asyncio.run(resolve.run(ctx))
    assert ctx.model == "chat" and ctx.requested_model == "auto"


def test_a_target_model_that_may_not_see_the_prompt_falls_back_or_is_refused():
    vague = {"hello": [0, 0, 0, 1]}  # "general": the model lives only on the external site
    stage, embedder, _ = _stage(vague)
    public = _route(stage, "hello")
    assert public.route.model == "central" and public.route.fallback_from is None
    confidential = _route(stage, "hello", DataClass.confidential)
    assert confidential.route.model == "chat" and confidential.route.fallback_from == "central"
    assert embedder.calls[-1][1] == DataClass.confidential  # embedded where confidential data may go
    strict, _, _ = _stage(vague, targets={**ROUTES["targets"], "general": {"model": "central", "description": "anything"}})
    with pytest.raises(ModelNotAllowed, match="no site allowed to process it"):
        _route(strict, "hello", DataClass.confidential)


def test_routing_degrades_to_the_default_target_and_says_why():
    stage, _, metrics = _stage(fail=True, embed_timeout_s=0.5)
    stage.routers["auto"].set_anchor_vectors([ANCHOR_VECTORS[t] for t in stage.routers["auto"].anchor_texts()])
    stage._ready["auto"].set()
    ctx = RequestContext("chat", RequestHeaders("r2"), NO_TRACE)
    ctx.scan = scan_request(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                            "chat", SPEC)
    ctx.classification = Classification(DataClass.public, DataClass.public)
    asyncio.run(stage.run(ctx))
    assert (ctx.route.target, ctx.route.reason, ctx.route.score) == ("general", "embedding_unavailable", None)
    no_text, _, _ = _stage()
    assert _route(no_text, None).route.reason == "no_text"
    with pytest.raises(InvalidRequest, match="embeddings need a model id"):
        _route(no_text, "x", endpoint="embeddings")


# ---- config checks -------------------------------------------------------------------------------

def _raw() -> dict:
    return json.loads(json.dumps(_semantic_config().model_dump(mode="json", exclude_none=True)))


@pytest.mark.parametrize("change, words", [
    (lambda raw: raw["router"]["semantic_routes"].update(chat=ROUTES), "also a model id"),
    (lambda raw: raw["router"]["semantic_routes"]["auto"].update(embedding_model="chat"), "not a configured embedding"),
    (lambda raw: raw["router"]["semantic_routes"]["auto"]["targets"]["code"].update(model="gpt-9"), "unknown model"),
    (lambda raw: raw["router"]["semantic_routes"]["auto"]["targets"]["code"].update(model="embed"),
     "is an embedding model"),
    (lambda raw: raw["router"]["semantic_routes"]["auto"].update(default="nothing"), "not one of the targets"),
    (lambda raw: raw["sites"][1].pop("external"), "needs `external`"),
    (lambda raw: raw["sites"][0].update(external={"base_url": "http://x/v1"}), "only such a site"),
    (lambda raw: raw["sites"][1]["external"].update(base_url="ftp://x"), "http(s) URL"),
    (lambda raw: raw["models"][2].update(replicas={"api": 2}), "0 or 1"),
    (lambda raw: raw["models"][0].pop("source"), "needs a `source`"),
    (lambda raw: raw["router"].update(site="api"), "external sites run no Ray nodes"),
    (lambda raw: raw["sites"][1]["external"].update(models={"nope": "x"}), "unknown model"),
])
def test_bad_routing_and_external_site_configs_fail_at_load(change, words):
    raw = _raw()
    change(raw)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(raw)


# ---- the external transport against a FAKE upstream ------------------------------------------------

class FakeUpstream:
    """A FAKE OpenAI-compatible API: answers each request with the next scripted status."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.seen = list(statuses), []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append((request.path, request.headers.get("authorization"), body))
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.json_response({"error": {"message": f"scripted {status}"}}, status=status)
        if body.get("stream"):
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            for token in ("a", "b"):
                await response.write(f'data: {{"choices":[{{"delta":{{"content":"{token}"}}}}]}}\n\n'.encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response({"model": body["model"], "choices": [], "usage": {"prompt_tokens": 1}})


@contextlib.asynccontextmanager
async def serving(upstream: FakeUpstream):
    """The FAKE upstream on a loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
    finally:
        await runner.cleanup()


async def _with_upstream(statuses, check, **endpoint):
    upstream = FakeUpstream(statuses)
    async with serving(upstream) as base_url:
        transport = ExternalTransport(SiteConfig.model_validate({
            "name": "api", "kind": "external", "external": {
                "base_url": base_url, "api_key_env": "FAKE_UPSTREAM_KEY", "retry_backoff_s": 0.01,
                "models": {"central": "remote-name"}, **endpoint}}))
        try:
            await check(transport, upstream)
        finally:
            await transport.close()


def _request(stream=False) -> EngineRequest:
    body = {"model": "central", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return EngineRequest("chat", json.dumps(body).encode(), "req-1", stream)


def test_the_external_transport_retries_before_the_first_byte_and_passes_answers_on(monkeypatch):
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-fake")

    async def check(transport, upstream):
        reply = await transport.send(_request(), "central")  # 503, then 429, then 200
        assert reply.status == 200 and json.loads(reply.body)["model"] == "remote-name"
        assert [seen[0] for seen in upstream.seen] == ["/v1/chat/completions"] * 3
        assert upstream.seen[0][1] == "Bearer sk-fake"
        upstream.statuses = [400]
        refused = await transport.send(_request(), "central")  # the request's own error: no retry
        assert refused.status == 400 and len(upstream.seen) == 4
        stream = (await transport.send(_request(stream=True), "central")).stream
        await stream.read_first()
        rest = stream.head
        while chunk := await stream.reader.read(1 << 16):
            rest += chunk
        stream.close(reusable=True)
        assert rest.count(b"data: ") == 3 and rest.endswith(b"data: [DONE]\n\n")

    asyncio.run(_with_upstream([503, 429], check, retries=2))


def test_the_external_transport_gives_up_with_a_transport_error_naming_the_site(monkeypatch):
    async def check(transport, upstream):
        with pytest.raises(TransportError, match="failed after 2 attempts: HTTP 502") as failed:
            await transport.send(_request(), "central")
        assert failed.value.replica == "external:api" and transport.failures == 1

    asyncio.run(_with_upstream([502, 502, 502], check, retries=1))

    async def nothing_listens():
        transport = ExternalTransport(SiteConfig.model_validate({
            "name": "api", "kind": "external",
            "external": {"base_url": "http://127.0.0.1:9/v1", "retries": 1, "retry_backoff_s": 0.01}}))
        try:
            with pytest.raises(TransportError, match="failed after 2 attempts"):
                await transport.send(_request(), "central")
        finally:
            await transport.close()

    asyncio.run(nothing_listens())


# ---- an external site as a spill target (router harness with FAKE engines) -------------------------

def test_public_requests_spill_to_an_external_site_and_confidential_ones_wait_on_prem():
    from tests.test_engine_port import FakeEngine
    from tests.test_request_path import MODEL, Cluster, Exchange, chat, wait_for

    async def main():
        upstream = FakeUpstream([])
        async with serving(upstream) as base_url:
            config = SpillwayConfig.model_validate({
                "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                          {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1},
                          {"name": "api", "kind": "external", "preference": 2,
                           "external": {"base_url": base_url, "models": {MODEL: "remote"}}}],
                "models": [{"id": MODEL, "source": "builtin:dense", "replicas": {"onprem": 1, "cloud": 0, "api": 1},
                            "engine": {"max_num_seqs": 1}, "spill_after_ms": 50}],
                "router": {"load_poll_interval_ms": 60_000, "inline_scan_max_bytes": 1 << 20},
            })
            slow = FakeEngine(tokens=40, delay_s=0.02)
            async with Cluster({"onprem-0": slow}, config) as cluster:
                first = asyncio.ensure_future(Exchange(chat(stream=True, max_tokens=40)).run(cluster.app))
                assert await wait_for(lambda: slow.running() == 1)
                public = await Exchange(chat(stream=True, max_tokens=40)).run(cluster.app)
                confidential = await Exchange(chat(max_tokens=40),
                                              headers={"x-data-classification": "confidential"}).run(cluster.app)
                await first
                return public, confidential, upstream, cluster

    public, confidential, upstream, cluster = run_async(main())
    assert public.status == 200 and public.response_headers["x-spillway-site"] == "api"
    assert public.response_headers["x-spillway-spill-reason"] != "none"
    assert public.body.endswith(b"data: [DONE]\n\n")
    assert confidential.status == 200 and confidential.response_headers["x-spillway-site"] == "onprem"
    assert [body["model"] for _, _, body in upstream.seen] == ["remote"]  # only the public one went out
    assert cluster.all_released_once()


def run_async(coro):
    return asyncio.run(coro)
