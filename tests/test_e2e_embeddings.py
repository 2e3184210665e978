"""End to end: /v1/embeddings with the real all-MiniLM-L6-v2 on the local cluster, through the
official ``openai`` SDK, and ``auto`` (semantic routing) composed with residency."""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import E2E_CENTRAL, E2E_CENTRAL_REMOTE, admin_headers, auth

pytestmark = pytest.mark.e2e

EMBED = "all-minilm-l6-v2"


def _unit(vectors) -> np.ndarray:
    matrix = np.array(vectors, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_embeddings_rank_related_sentences_above_unrelated_ones(client):
    sentences = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue grew 12%.",
                 "Profits rose sharply in the last three months."]
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=sentences)
    answer = raw.parse()
    assert raw.headers["x-spillway-site"] == "onprem" and raw.headers["x-spillway-model"] == EMBED
    assert [item.index for item in answer.data] == [0, 1, 2, 3]
    assert all(len(item.embedding) == 384 for item in answer.data)
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens == answer.usage.prompt_tokens
    sim = _unit([item.embedding for item in answer.data]) @ _unit([item.embedding for item in answer.data]).T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3  # cat ~ feline, not revenue
    assert sim[2, 3] > sim[2, 0] + 0.3  # revenue ~ profits, not cat


def test_single_string_base64_and_token_id_inputs(client):
    floats = client.embeddings.create(model=EMBED, input="The cat sits on the mat.", encoding_format="float")
    packed = httpx.post(f"{client.base_url}embeddings", headers=auth(), timeout=60,
                        json={"model": EMBED, "input": "The cat sits on the mat.", "encoding_format": "base64"})
    assert packed.status_code == 200, packed.text
    decoded = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (384,) and np.allclose(decoded, floats.data[0].embedding, atol=1e-5)
    # token ids (opaque to the PII scan: classified confidential, so on-prem, where MiniLM runs anyway)
    tokens = client.embeddings.create(model=EMBED, input=[[101, 4937, 102], [101, 3899, 102]])
    assert len(tokens.data) == 2 and len(tokens.data[1].embedding) == 384


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok"] * 257}, "input"),
    ({"input": "hi", "encoding_format": "bytes"}, "encoding_format"),
    ({"input": 5}, "input"),
])
def test_bad_embedding_requests_get_400_in_openais_format(client, body, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBED, **body)
    assert refused.value.body["param"] == param and refused.value.body["message"]


def test_a_chat_model_asked_for_embeddings_and_the_reverse_get_400(client):
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model="spillway-dense", input="hello")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="Matryoshka|dimensions"):  # MiniLM has one size
        client.embeddings.create(model=EMBED, input="hello", dimensions=8)


# ---- semantic routing ----------------------------------------------------------------------------

CLEAR = {
    "legal": "Our supplier breached the contract. Can we terminate it and claim damages under the liability clause?",
    "code": "Write a Python function that parses a JSON file and returns the keys sorted alphabetically.",
    "general": "What are some fun things to do with kids on a rainy weekend?",
}


def _route(raw) -> dict:
    target, *fields = [part.strip() for part in raw.headers["x-spillway-route"].split(";")]
    return {"target": target, **dict(field.split("=", 1) for field in fields)}


def test_auto_sends_clearly_legal_code_and_general_prompts_to_their_targets(client, e2e_cluster, external_api):
    external_api[0].wait_ready()
    listed = {model.id: model for model in client.models.list().data}
    assert listed["auto"].routes_to["general"] == E2E_CENTRAL and EMBED in listed
    targets = e2e_cluster[0].router.semantic_routes["auto"].targets
    for expected, prompt in CLEAR.items():
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4)
        route = _route(raw)
        assert route["target"] == expected and route["reason"] == "match", (prompt, route)
        assert float(route["score"]) >= e2e_cluster[0].router.semantic_routes["auto"].threshold
        assert raw.headers["x-spillway-model"] == targets[expected].model
    # the general model lives only on the external site: that is where it ran
    assert raw.headers["x-spillway-site"] == "api"
    assert external_api[1].seen(f'"model":"{E2E_CENTRAL_REMOTE}"'.encode())


def test_a_confidential_prompt_routed_by_auto_never_reaches_the_external_site(client, external_api):
    external_api[0].wait_ready()
    marker = "iban DE89 3704 0044 0532 0130 00"
    prompt = f"{CLEAR['general']} Also, my account is {marker}."
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4)
    route = _route(raw)
    assert raw.headers["x-spillway-data-class"] in ("confidential", "restricted")
    assert route["target"] == "general" and route["fallback_from"] == E2E_CENTRAL
    assert raw.headers["x-spillway-model"] == "spillway-dense" and raw.headers["x-spillway-site"] == "onprem"
    with pytest.raises(openai.PermissionDeniedError, match="no site allowed to process it"):
        client.chat.completions.create(model="auto-strict", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=4)
    assert not external_api[1].seen(b"DE89")  # neither answer sent it there
    assert not external_api[1].seen(b"3704 0044")


def test_the_routing_choice_is_in_the_audit_record_and_the_trace(base_url, client):
    from tests.test_e2e_observability import _router_spans

    request_id = f"route-audit-{uuid.uuid4().hex[:8]}"
    trace_id = uuid.uuid4().hex
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": CLEAR["code"]}], max_tokens=4,
                                   extra_headers={"x-request-id": request_id,
                                                  "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})

    def ours() -> list[dict]:
        rows = httpx.get(f"{base_url}/v1/spillway/admin/audit", params={"limit": 1000}, headers=admin_headers(),
                         timeout=60).json()["data"]
        return [r for r in rows if r["request_id"] == request_id]

    deadline = time.monotonic() + 30
    while not (records := ours()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the routers' settlement batches are on their way
    assert records, "the audit record never arrived"
    assert records[0]["model"] == "auto" and records[0]["variant"] == "spillway-dense"
    assert records[0]["route"]["target"] == "code" and records[0]["route"]["reason"] == "match"
    spans = {s["name"]: s for s in _router_spans(base_url, trace_id, {"spillway.request",
                                                                      "spillway.semantic_route"}).values()}
    route = spans["spillway.semantic_route"]["attributes"]
    assert route["spillway.route_target"] == "code" and route["spillway.route_score"] >= 0.15
    assert spans["spillway.request"]["attributes"]["spillway.route_target"] == "code"
