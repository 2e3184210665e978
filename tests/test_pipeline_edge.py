"""The edge of the request path without Ray: the scan of a body (strict decoding, shape checks,
every string the engine sees, opaque content, sequences), the helper process for large bodies,
header checks, bounded body reads, and the resolve and classify stages (fail closed)."""

import asyncio
import json

import msgspec
import pytest

from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequest, ModelNotFound, PayloadTooLarge, RequestTimeout
from serve_app.http.body import read_body
from serve_app.http.headers import read_headers
from serve_app.pipeline.classify import ClassifyStage
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.resolve import ResolveStage
from serve_app.pipeline.scan import ScanSpec, compose_body, result_from_wire, result_to_wire, scan_request
from serve_app.pipeline.scanner import Scanner
from serve_app.pipeline.schema import ShapeLimits
from serve_app.policy.classify import DataClass
from serve_app.policy.splits import TrafficSplit, Variant
from serve_app.observe.tracing import NO_TRACE

SPEC = ScanSpec(ShapeLimits(max_n=4, max_prompts=8, max_messages=100), max_json_depth=32)
HELLO = [{"role": "user", "content": "hi"}]


def scan(body, endpoint="chat"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return scan_request(raw, endpoint, SPEC)


@pytest.mark.parametrize("raw, param, words", [
    (b'{"model": "m", "messages": 5}', "messages", "non-empty array"),
    (b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": true}]}', "messages[0].tool_calls", "array"),
    (b'{"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]}',
     "messages[0].tool_calls[0].function.arguments", "string"),
    (b'{"model": "m", "messages": [{"role": 7}]}', "messages[0].role", "string"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
     "messages[0].content[0].text", "string"),
    (b'{"model": "m", "messages": [{"role": "user", "content": {"a": 1}}]}', "messages[0].content", "string"),
    (b'{"model": 5, "messages": []}', "model", "string"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "required"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream", "boolean"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 5}', "n", "between 1 and 4"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": true}', "n", "integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens", "integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens", "at least 0"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": '
     b'-9223372036854775808}', "max_completion_tokens", "at least 0"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens", "integer"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": []}', "stream_options", "object"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": {}}', "tools", "array"),
])
def test_wrong_types_are_400_naming_the_parameter(raw, param, words):
    result = scan(raw)
    assert result.status == 400 and result.param == param and words in result.message


def test_max_tokens_past_the_context_is_valid_and_max_completion_tokens_wins():
    """An engine clamps max_tokens to what the context leaves, so a huge one is a valid request (the
    router bounds what it makes of it); 0 is the engine's to judge (echo without generation)."""
    for body, expected in [({"max_tokens": 10**12}, 10**12), ({"max_tokens": 0}, 0),
                           ({"max_tokens": 7, "max_completion_tokens": 9}, 9), ({"max_completion_tokens": 3}, 3)]:
        result = scan({"model": "m", "messages": HELLO, **body})
        assert result.status == 200 and result.shape.max_tokens == expected, (body, result.message)


@pytest.mark.parametrize("raw, words", [
    (b'{"model": "m", "messages": [', "not valid JSON"),
    (b'[1, 2, 3]', "must be a JSON object"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "t": 1e999}', "out of range"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}', "UTF-8"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "not valid JSON"),  # lone surrogate
    (b'{"model": "m", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),  # parses, too deep
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32"),  # past the decoder's own recursion
])
def test_malformed_bodies_are_400(raw, words):
    result = scan(raw)
    assert result.status == 400 and words in result.message, result.message


def test_every_string_the_engine_sees_is_scanned():
    tool = {"type": "function", "function": {"name": "lookup", "description": "contact bob@corp.example for access",
                                             "parameters": {"type": "object", "properties": {}}}}
    assert [f.detector for f in scan({"model": "m", "messages": HELLO, "tools": [tool]}).findings] == ["email"]
    named = {"model": "m", "messages": [{"role": "user", "name": "DE89370400440532013000", "content": "hi"}]}
    assert [f.detector for f in scan(named).findings] == ["iban"]
    call = {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "pay", "arguments": '{"card": "4111111111111111"}'}}]}]}
    assert [f.detector for f in scan(call).findings] == ["card"]
    extra = {"model": "m", "messages": HELLO, "chat_template_kwargs": {"note": "john@example.org"}}
    assert [f.detector for f in scan(extra).findings] == ["email"]
    keyed = {"model": "m", "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"properties": {"jane@example.org": {"type": "string"}}}}}}
    assert [f.detector for f in scan(keyed).findings] == ["email"]  # keys too
    prompts = {"model": "m", "prompt": ["nothing", "mail me: a@b.io"]}
    assert [f.detector for f in scan(prompts, "completions").findings] == ["email"]


def test_token_ids_images_and_embeddings_are_opaque_and_sequences_counted():
    ids = scan({"model": "m", "prompt": [[1, 2], [3]], "n": 2}, "completions")
    assert ids.shape.opaque == ("token_ids",) and ids.shape.sequences == 4
    image = scan({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]})
    assert image.shape.opaque == ("image_url",) and image.shape.sequences == 1
    embeds = scan({"model": "m", "prompt_embeds": "AAAA"}, "completions")
    assert embeds.shape.opaque == ("prompt_embeds",)
    assert scan({"model": "m", "prompt": ["a", "b", "c"], "n": 3}, "completions").shape.sequences == 9
    too_many = scan({"model": "m", "prompt": ["x"] * 9}, "completions")
    assert too_many.status == 400 and too_many.param == "prompt"


def test_the_engine_body_is_the_original_with_model_and_usage_set_by_the_router():
    result = scan({"model": "alias", "messages": HELLO, "stream": True, "stream_options": {"include_usage": False},
                   "temperature": 0.5, "text": "é"})
    body = json.loads(compose_body(result.rest, "variant-b", {"include_usage": True}))
    assert body == {"model": "variant-b", "stream_options": {"include_usage": True}, "messages": HELLO,
                    "stream": True, "temperature": 0.5, "text": "é"}
    bare = scan_request(b'{"model": "m", "prompt": "x"}', "completions", SPEC)
    assert json.loads(compose_body(bare.rest, "m", None)) == {"model": "m", "prompt": "x"}


def test_scan_results_survive_the_helper_wire_form():
    result = scan({"model": "m", "messages": [{"role": "user", "content": "a@b.io"}], "n": 2})
    encoded = msgspec.msgpack.encode(result_to_wire(result))
    assert result_from_wire(msgspec.msgpack.decode(encoded)) == result


def test_large_bodies_are_scanned_in_the_helper_and_the_loop_keeps_running_meanwhile():
    """A 1 MiB body of a third of a million empty objects takes the parser hundreds of
    milliseconds. Scanned inline, the event loop could not run once until it was done; in the
    helper process the loop keeps running: a ticker gets many turns while the scan is under way."""

    async def ticks_during(scanner: Scanner, body: bytes):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        result = await scanner.scan(body, "chat")
        during = ticks - before
        tick.cancel()
        return result, during

    async def main():
        hostile = (b'{"model": "m", "messages": [{"role": "user", "content": "a@b.io"}], "junk": ['
                   + b"{}," * 330_000 + b"{}]}")
        production = Scanner(SPEC, inline_max_bytes=16_384, workers=1)
        await production.warm()
        result, during = await ticks_during(production, hostile)
        small = await production.scan(json.dumps({"model": "m", "messages": HELLO}).encode(), "chat")
        await production.close()
        inline = Scanner(SPEC, inline_max_bytes=1 << 30)
        _, during_inline = await ticks_during(inline, hostile)
        return result, small, during, during_inline, production.offloaded

    result, small, during, during_inline, offloaded = asyncio.run(main())
    assert result.status == 200 and [f.detector for f in result.findings] == ["email"]
    assert small.status == 200 and offloaded == 1  # only the large one left the loop
    assert during_inline == 0  # (the baseline: inline, nothing else ran until the scan was done)
    assert during >= 10  # the loop ran other work all along


def test_a_dead_helper_is_replaced_and_the_scan_still_happens():
    async def main():
        scanner = Scanner(SPEC, inline_max_bytes=0, workers=1)
        first = await scanner.scan(json.dumps({"model": "m", "messages": HELLO}).encode(), "chat")
        scanner._helpers[0].kill()
        second = await scanner.scan(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x@y.io"}]}).encode(),
                                    "chat")
        await scanner.close()
        return first, second

    first, second = asyncio.run(main())
    assert first.status == 200 and [f.detector for f in second.findings] == ["email"]


@pytest.mark.parametrize("headers, param", [
    ({"x-request-id": "has spaces"}, "x-request-id"),
    ({"x-request-id": "x" * 129}, "x-request-id"),
    ({"x-request-id": "new\nline"}, "x-request-id"),
    ({"x-spillway-priority": "urgent"}, "x-spillway-priority"),
    ({"x-spillway-priority": "11"}, "x-spillway-priority"),
    ({"x-spillway-priority": "9" * 5000}, "x-spillway-priority"),
    ({"x-data-classification": "top-secret"}, "x-data-classification"),
    ({"x-session-id": "s" * 300}, "x-session-id"),
    ({"x-session-id": "caf\u00e9"}, "x-session-id"),
    ({"x-spillway-tenant": "a/b"}, "x-spillway-tenant"),
])
def test_bad_headers_are_400_naming_the_header(headers, param):
    with pytest.raises(InvalidRequest) as info:
        read_headers(headers)
    assert info.value.param == param


def test_good_headers_are_read_and_the_routing_mode_only_in_benchmark_mode():
    parsed = read_headers({"x-request-id": "abc-1.2:3", "x-spillway-priority": "-3", "x-session-id": "s 1",
                           "x-data-classification": "Internal", "x-spillway-routing": "pow2"})
    assert (parsed.request_id, parsed.priority, parsed.session, parsed.declared_class, parsed.routing_mode) == (
        "abc-1.2:3", -3, "s 1", DataClass.internal, None)
    assert read_headers({"x-spillway-routing": "pow2"}, benchmark_modes=True).routing_mode == "pow2"
    with pytest.raises(InvalidRequest):
        read_headers({"x-spillway-routing": "random"}, benchmark_modes=True)
    assert len(read_headers({}).request_id) == 32 and read_headers({}).declared_class is None


class FakeRequest:
    """What ``read_body`` reads: headers and the body as the server delivers it, in chunks."""

    def __init__(self, chunks, headers=None):
        self.headers = headers or {}
        self._chunks = chunks
        self.read = 0

    async def stream(self):
        for chunk in self._chunks:
            self.read += 1
            yield chunk


def test_bodies_are_bounded_while_they_are_read_chunked_ones_too():
    async def main():
        declared = FakeRequest([b"x" * 10], {"content-length": "5000"})
        with pytest.raises(PayloadTooLarge):
            await read_body(declared, 1000, 30)
        assert declared.read == 0  # refused before a byte was read
        chunked = FakeRequest([b"x" * 400] * 1000)  # no content-length: 400 KB in chunks
        with pytest.raises(PayloadTooLarge):
            await read_body(chunked, 1000, 30)
        assert chunked.read == 3  # stopped at the chunk that passed the limit
        with pytest.raises(InvalidRequest):
            await read_body(FakeRequest([b""], {"content-length": "-1"}), 1000, 30)
        assert await read_body(FakeRequest([b"ab", b"cd"]), 1000, 30) == b"abcd"

    asyncio.run(main())


class StalledRequest(FakeRequest):
    """A body that stops after its first chunk and never goes on (a client trickling, or gone quiet)."""

    async def stream(self):
        yield b'{"model": '
        self.read += 1
        await asyncio.Event().wait()


def test_a_body_that_stops_half_way_is_a_408_within_the_body_timeout():
    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout) as caught:
            await read_body(StalledRequest([], {"content-length": "100"}), 1000, 0.05)
        return loop.time() - started, caught.value

    waited_s, error = asyncio.run(main())
    assert 0.05 <= waited_s < 5  # (it ends at the deadline, not when the client decides)
    assert (error.status, error.code) == (408, "request_timeout") and "10 bytes came" in error.message


def context(body, endpoint="chat", declared=None) -> RequestContext:
    ctx = RequestContext(endpoint, RequestHeaders("r1", declared_class=declared), NO_TRACE)
    ctx.scan = scan(body, endpoint)
    return ctx


MODELS = {"dense": ModelConfig(id="dense", source="builtin:dense", replicas={"onprem": 1},
                               engine={"max_num_seqs": 4}),
          "moe": ModelConfig(id="moe", source="builtin:moe", replicas={"onprem": 1})}


def test_resolve_picks_a_sticky_split_variant_and_checks_what_only_the_model_tells():
    async def main():
        stage = ResolveStage(MODELS, {"chat": TrafficSplit("chat", [Variant("dense", 1), Variant("moe", 1)])})
        ctx = context({"model": "chat", "messages": HELLO, "user": "u-1"})
        await stage.run(ctx)
        again = context({"model": "chat", "messages": HELLO, "user": "u-1"})
        await stage.run(again)
        assert ctx.model == again.model and ctx.requested_model == "chat" and ctx.split is not None
        with pytest.raises(ModelNotFound):
            await stage.run(context({"model": "gpt-17", "messages": HELLO}))
        with pytest.raises(InvalidRequest) as info:  # 2 prompts x n=3 > the 4 sequences one engine runs
            await stage.run(context({"model": "dense", "prompt": ["a", "b"], "n": 3}, "completions"))
        assert info.value.param == "n" and "sequences" in info.value.message

    asyncio.run(main())


def test_classify_raises_for_pii_opaque_content_and_scan_errors_and_fails_closed():
    async def main():
        stage = ClassifyStage(DataClass.public, DataClass.confidential)
        plain = context({"model": "m", "messages": HELLO})
        await stage.run(plain)
        assert plain.classification.data_class is DataClass.public
        pii = context({"model": "m", "messages": [{"role": "user", "content": "a@b.io"}]})
        await stage.run(pii)
        assert pii.classification.data_class is DataClass.confidential and pii.classification.raised_by == ["email"]
        ids = context({"model": "m", "prompt": [1, 2, 3]}, "completions")
        await stage.run(ids)
        assert ids.classification.data_class is DataClass.confidential
        assert ids.classification.raised_by == ["opaque:token_ids"]
        declared = context({"model": "m", "prompt": [1, 2, 3]}, "completions", declared=DataClass.internal)
        await stage.run(declared)  # the client declared a class: opaque content takes it
        assert declared.classification.data_class is DataClass.internal
        broken = context({"model": "m", "messages": HELLO})
        broken.scan.scan_error = "RuntimeError"
        await stage.run(broken)
        assert broken.classification.data_class is DataClass.confidential
        assert broken.classification.raised_by == ["classifier_error"]
        failing = context({"model": "m", "messages": HELLO})
        failing.scan.findings = None  # the decision itself errors: confidential all the same
        await stage.run(failing)
        assert failing.classification.data_class is DataClass.confidential

    asyncio.run(main())
