"""End to end: bad input gets an OpenAI-format error with the right status, never a stack trace."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import E2E_BODY_TIMEOUT_S, E2E_CLIENT_TIMEOUT_S, E2E_MAX_BODY_BYTES, auth

pytestmark = pytest.mark.e2e

DENSE = "spillway-dense"
HELLO = [{"role": "user", "content": "hi"}]


def _assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert {"type", "code", "param"} <= set(body["error"])
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    assert resp.headers["x-request-id"]
    assert resp.headers["x-spillway-site"] == "onprem"  # answered by the router, which runs on-prem
    return body["error"]


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as http:
        yield http


def test_invalid_json_is_400(http):
    resp = http.post("/v1/chat/completions", content=b'{"model": "spillway-dense", "messages": [', headers={"content-type": "application/json"})
    assert "not valid JSON" in _assert_openai_error(resp, 400)["message"]


def test_non_object_json_is_400(http):
    resp = http.post("/v1/chat/completions", json=[1, 2, 3])
    _assert_openai_error(resp, 400)


def test_missing_model_is_400(http):
    resp = http.post("/v1/chat/completions", json={"messages": HELLO})
    assert _assert_openai_error(resp, 400)["param"] == "model"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": DENSE, "messages": "hello"}, "messages"),
        ({"model": DENSE, "messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"model": DENSE, "messages": HELLO, "max_tokens": -1}, "max_tokens"),
        ({"model": DENSE, "messages": HELLO, "temperature": -3}, None),
        ({"model": DENSE, "messages": HELLO, "stream": "sometimes"}, "stream"),
        ({"model": DENSE, "messages": HELLO, "n": 0}, None),
    ],
)
def test_schema_errors_are_400_not_422(http, body, param):
    error = _assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    if param:
        assert param in (error["param"] or "") or param in error["message"]


def test_completions_schema_error_is_400(http):
    _assert_openai_error(http.post("/v1/completions", json={"model": DENSE, "prompt": {"x": 1}}), 400)


def test_unknown_model_is_404_through_the_sdk(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
    assert "gpt-17" in info.value.body["message"]


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DENSE, messages=[{"role": "user", "content": "x" * 3000}], max_tokens=4)
    assert "context length" in info.value.body["message"]


def test_body_over_the_limit_is_413(http, client):
    big = "y" * (E2E_MAX_BODY_BYTES + 10)
    resp = http.post("/v1/chat/completions", json={"model": DENSE, "messages": [{"role": "user", "content": big}]})
    assert "limit" in _assert_openai_error(resp, 413)["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=DENSE, messages=[{"role": "user", "content": big}])
    assert info.value.status_code == 413


def test_unknown_route_is_404_in_openai_format(http):
    _assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_bad_streaming_request_fails_before_the_stream_starts(http):
    resp = http.post("/v1/chat/completions", json={"model": DENSE, "messages": "x", "stream": True})
    _assert_openai_error(resp, 400)


def test_vllm_request_checks_are_400_and_do_not_fail_the_engine(http):
    """vLLM rejects stream_options without stream in a validator of its own: still the client's
    error (400 with the parameter), never a 503 that would hold the engine out."""
    body = {"model": "spillway-dense", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "stream_options": {"include_usage": True}}
    for _ in range(3):  # repeated: a 503 would also have put the engine group in cooldown
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "stream_options"
    ok = http.post("/v1/chat/completions", json={**body, "stream_options": None})
    assert ok.status_code == 200


def test_cluster_still_serves_after_bad_input(client):
    assert client.chat.completions.create(model=DENSE, messages=HELLO, max_tokens=2).choices


@pytest.mark.parametrize("raw, words", [
    (b'{"model": "spillway-dense", "messages": 5}', "messages"),
    (b'{"model": "spillway-dense", "messages": [{"role": "assistant", "tool_calls": true}]}', "tool_calls"),
    (b'{"model": "spillway-dense", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN"),
    (b'{"model": "spillway-dense", "messages": [{"role": "user", "content": "\xc3\x28"}]}', "UTF-8"),
    (b'{"model": "spillway-dense", "x": ' + b"[" * 950 + b"]" * 950 + b"}", "nested"),
    (b"[" * 200_000 + b"]" * 200_000, "nested"),
])
def test_malformed_bodies_are_400_and_the_engines_stay_healthy(http, raw, words):
    error = _assert_openai_error(http.post("/v1/chat/completions", content=raw,
                                           headers={"content-type": "application/json"}), 400)
    assert words in error["message"] or words in (error["param"] or "")
    # Nothing of it reached an engine: a normal request right after is served on-prem, no spill.
    ok = http.post("/v1/chat/completions", json={"model": DENSE, "messages": HELLO, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-spillway-site"] == "onprem" and ok.headers["x-spillway-spill-reason"] == "none"


def test_chunked_bodies_are_bounded_while_read(http):
    def chunks():
        for _ in range(E2E_MAX_BODY_BYTES // 1000 + 50):  # no content-length: the router counts
            yield b"x" * 1000

    resp = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "limit" in _assert_openai_error(resp, 413)["message"]


def test_a_silent_connection_and_a_stalled_body_are_let_go_in_bounded_time(base_url):
    """Before: a connection that sent nothing was held for an hour, and a router waited for a
    body's missing bytes for ever, holding a request slot (2,100 such clients locked every client
    out). Now the router answers a body that stops half-way with an OpenAI-format 408 after
    ``router.body_timeout_s``, and the router's listener closes a connection that sends no request
    after ``http.client_timeout_s``; meanwhile others are served."""
    import json
    import socket
    import time
    from urllib.parse import urlsplit

    address = urlsplit(base_url)
    body = json.dumps({"model": DENSE, "messages": HELLO, "max_tokens": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth()['authorization']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    silent = socket.create_connection((address.hostname, address.port))
    stalled = socket.create_connection((address.hostname, address.port))
    stalled.sendall(head + body[:10])
    with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as client:  # others are served meanwhile
        assert client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                           ).status_code == 200

    def until_closed(sock: socket.socket) -> tuple[bytes, float]:
        sock.settimeout(60)
        received = b""
        while chunk := sock.recv(65536):  # (a socket.timeout here: it was never let go)
            received += chunk
        sock.close()
        return received, time.monotonic() - started

    answer, answered_after = until_closed(stalled)
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert E2E_BODY_TIMEOUT_S - 0.5 <= answered_after < 60  # (not before its deadline; and not held for ever)
    silent_answer, closed_after = until_closed(silent)
    assert silent_answer == b""  # it never began a request: closed without a word
    assert E2E_CLIENT_TIMEOUT_S - 0.5 <= closed_after < 90


@pytest.mark.parametrize("headers, param", [
    ({"x-request-id": "not valid"}, "x-request-id"),
    ({"x-request-id": "r" * 200}, "x-request-id"),
    ({"x-session-id": "s" * 1000}, "x-session-id"),
])
def test_bad_header_values_are_400(http, headers, param):
    resp = http.post("/v1/chat/completions", json={"model": DENSE, "messages": HELLO, "max_tokens": 2}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_a_pathological_prompt_does_not_delay_other_requests(base_url):
    """400 KB of e-mail-like characters once froze a router replica for 110 s (its e-mail pattern
    backtracked). Now a concurrent request is delayed less than 100 ms (median of six tries, on
    whichever router each lands) and never a second: on two cores shared by a dozen processes one
    try in a few CI runs was once held up 0.43 s by something else, and the bound on the median is
    what tells a scan that blocks the loop from such a stall."""
    import statistics
    import threading
    import time

    small = {"model": DENSE, "messages": HELLO, "max_tokens": 2}
    hostile = {"model": DENSE, "messages": [{"role": "user", "content": "a." * 200_000}], "max_tokens": 2}
    with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as client:
        def latency() -> float:
            started = time.perf_counter()
            assert client.post("/v1/chat/completions", json=small).status_code == 200
            return time.perf_counter() - started

        alone = statistics.median([latency() for _ in range(7)])
        answers = []

        def send_hostile():
            with httpx.Client(headers=auth(), base_url=base_url, timeout=60) as other:
                answers.append(other.post("/v1/chat/completions", json=hostile))

        delays = []
        for _ in range(6):
            thread = threading.Thread(target=send_hostile)
            thread.start()
            time.sleep(0.005)  # the hostile body is being read and scanned now
            delays.append(latency() - alone)
            thread.join()
    assert all(a.status_code == 400 and "context length" in a.json()["error"]["message"] for a in answers)
    assert statistics.median(delays) < 0.100 and max(delays) < 1.0, (alone, delays)


@pytest.mark.parametrize("content, detector", [
    ("mail john\u200b@example.com", "email"),
    ("mail john\uff20example.com", "email"),
    ("IBAN DE89\u200d3704\u200d0044\u200d0532\u200d0130\u200d00", "iban"),
    ("card 4111.1111.1111.1111", "card"),
])
def test_hidden_pii_is_found_and_kept_on_prem(http, content, detector):
    resp = http.post("/v1/chat/completions", json={"model": DENSE, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200
    assert resp.headers["x-spillway-data-class"] == "confidential" and resp.headers["x-spillway-site"] == "onprem"


def test_pii_in_a_tool_definition_and_token_id_prompts_are_confidential(http):
    tool = {"type": "function", "function": {"name": "lookup", "description": "ask bob@corp.example",
                                             "parameters": {"type": "object", "properties": {}}}}
    resp = http.post("/v1/chat/completions", json={"model": DENSE, "messages": HELLO, "max_tokens": 2, "tools": [tool]})
    assert resp.status_code == 200 and resp.headers["x-spillway-data-class"] == "confidential"
    ids = http.post("/v1/completions", json={"model": DENSE, "prompt": [72, 105], "max_tokens": 2})
    assert ids.status_code == 200 and ids.headers["x-spillway-data-class"] == "confidential"
    declared = http.post("/v1/completions", json={"model": DENSE, "prompt": [72, 105], "max_tokens": 2},
                         headers={"x-data-classification": "public"})
    assert declared.status_code == 200 and declared.headers["x-spillway-data-class"] == "public"


def test_n_beyond_what_an_engine_runs_is_400(http):
    resp = http.post("/v1/completions", json={"model": DENSE, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"  # 9 sequences; dense runs 8 per engine
