"""Locust users for Spillway.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000 \
        --csv loadtests/results/run

Custom rows in Locust's statistics (and CSVs), per model:
- ``TTFT``: time to the first content token, timed when its bytes arrive;
- ``ITL``: mean inter-token latency of the request;
- ``E2E``: whole request; its "content size" column is the output token count.
Every request's HTTP status is checked; a stream that ends without ``[DONE]`` or with an
error event counts as a failure.

Settings (environment variables): ``SPILLWAY_MODEL`` (default spillway-dense),
``SPILLWAY_MAX_TOKENS`` (default 64), ``SPILLWAY_PROMPT_WORDS`` (default 32).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, task

# Locust puts only this folder on sys.path; the helpers live in the `loadtests` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.sse import time_stream  # noqa: E402

MODEL = os.environ.get("SPILLWAY_MODEL", "spillway-dense")
MAX_TOKENS = int(os.environ.get("SPILLWAY_MAX_TOKENS", "64"))
PROMPT_WORDS = int(os.environ.get("SPILLWAY_PROMPT_WORDS", "32"))
WORDS = "river lake stream spill dam flood basin delta channel canal reservoir weir".split()


def prompt(words: int = PROMPT_WORDS) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words))


def report(environment, kind: str, name: str, millis: float | None, size: int = 0, exception=None) -> None:
    if millis is None and exception is None:
        return
    environment.events.request.fire(
        request_type=kind, name=name, response_time=millis or 0.0, response_length=size,
        exception=exception, context={},
    )


class StreamingChatUser(HttpUser):
    """Streaming chat: TTFT, ITL, end-to-end latency and output tokens per request."""

    wait_time = between(0.0, 0.2)
    headers: dict[str, str] = {}

    @task
    def stream_chat(self) -> None:
        body = {
            "model": MODEL, "messages": [{"role": "user", "content": prompt()}], "max_tokens": MAX_TOKENS,
            "stream": True, "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name=f"chat stream {MODEL}") as response:
            timing = time_stream(response, started)
            if timing.error:
                response.failure(f"HTTP {timing.status}: {timing.error}")
            else:
                response.success()
        failure = RuntimeError(timing.error) if timing.error else None
        report(self.environment, "TTFT", MODEL, timing.ttft_ms, exception=failure)
        report(self.environment, "ITL", MODEL, timing.itl_ms)
        report(self.environment, "E2E", MODEL, timing.e2e_ms, size=timing.output_tokens, exception=failure)
