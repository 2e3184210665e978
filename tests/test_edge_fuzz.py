"""Random malformed request bodies through the real ASGI app and pipeline (FAKE engines on real
engine ports, as in ``test_request_path.py``): every answer is a success or a 4xx in OpenAI's error
format, never a 5xx, and every sequence taken is given back. Seeded, so a failure reproduces."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from tests.test_request_path import MODEL, Cluster, Exchange, chat, config, engines, run

VALUES = [None, True, False, 0, -1, 1, 2**63, -2**63, 1e308, -0.0, 0.5, "", "x", "\u200b", "a" * 300, [], {},
          [1, 2], {"a": 1}, [{"type": "text", "text": "hi"}], [{"type": "image_url", "image_url": {"url": "data:,"}}],
          {"type": "text"}, "auto", "none", [{"role": "user", "content": "hi"}], [[1, 2, 3]], [1, 2, 3]]
KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
        "temperature", "tools", "tool_choice", "stop", "logprobs", "seed", "user", "response_format", "echo",
        "functions", "prompt_embeds"]
MESSAGE_KEYS = ["role", "content", "name", "tool_calls", "tool_call_id", "function_call"]


def message(rnd: random.Random) -> dict:
    m = {"role": rnd.choice(["user", "assistant", "system", "tool", "developer", "bogus", 5]), "content": "hi"}
    for _ in range(rnd.randint(0, 3)):
        key = rnd.choice(MESSAGE_KEYS)
        m[key] = rnd.choice(VALUES) if rnd.random() < 0.5 or key != "tool_calls" else [
            {"id": rnd.choice(["c", 1, None]), "type": rnd.choice(["function", "x", None]),
             "function": rnd.choice([{"name": "f", "arguments": rnd.choice(["{}", {}, 1, None])}, None, "f", {}])}]
    return m


def body(rnd: random.Random, path: str) -> dict:
    b = chat(max_tokens=2) if path.endswith("chat/completions") else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for _ in range(rnd.randint(1, 4)):
        key = rnd.choice(KEYS)
        if key == "messages" and rnd.random() < 0.6:
            b[key] = [message(rnd) for _ in range(rnd.randint(1, 3))]
        elif key == "tools" and rnd.random() < 0.6:
            b[key] = [{"type": rnd.choice(["function", 1, None]),
                       "function": rnd.choice([{"name": "f", "parameters": rnd.choice(VALUES)}, {"name": rnd.choice(VALUES)},
                                               None, {}])}]
        else:
            b[key] = rnd.choice(VALUES)
    return b


@pytest.mark.parametrize("seed", [1, 2])
def test_random_malformed_bodies_get_a_success_or_an_openai_4xx_and_give_every_sequence_back(seed):
    rnd = random.Random(seed)

    async def main():
        answers = []
        async with Cluster(engines(), config()) as cluster:
            for _ in range(300):
                path = rnd.choice(["/v1/chat/completions", "/v1/completions"])
                raw = json.dumps(body(rnd, path)).encode()
                answers.append((raw, await asyncio.wait_for(Exchange(raw, path=path).run(cluster.app), 20)))
            return answers, cluster.all_released_once()

    answers, released = run(main())
    for raw, answer in answers:
        assert answer.status in (200, 400, 404), (answer.status, raw[:300], answer.body[:300])
        if answer.status != 200:
            error = json.loads(answer.body)["error"]
            assert error["message"] and error["type"] == "invalid_request_error", (raw[:300], error)
    assert sum(a.status == 400 for _, a in answers) > 50  # the generator does produce bad input
    assert released
