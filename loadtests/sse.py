"""Timing an OpenAI-style SSE stream the way a client experiences it.

The first token is timed when its bytes arrive: the body is read with
``iter_content(chunk_size=None)``, which hands over each piece as the socket
delivers it. (Locust's FastHttpUser streaming helpers read fixed 1 KB chunks,
so a short stream's first token sits in a buffer until the kilobyte fills or
the stream ends, which inflated TTFT about fourfold in our measurements.)
Events are split on the blank line between SSE events, never on text line
breaks: generated text can contain U+2028 and friends.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class StreamTiming:
    status: int
    ttft_ms: float | None = None
    e2e_ms: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # (from the usage event, when the stream sends one)
    token_gaps_ms: list[float] = field(default_factory=list)
    site: str | None = None
    error: str | None = None
    done: bool = False

    @property
    def itl_ms(self) -> float | None:
        """Mean inter-token latency: gaps between content events after the first."""
        return sum(self.token_gaps_ms) / len(self.token_gaps_ms) if self.token_gaps_ms else None


def sse_payloads(chunks: Iterable[bytes]):
    """Yield each SSE ``data:`` payload (bytes) as soon as its event is complete."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                yield event[6:]


def time_stream(response, started: float, clock=time.perf_counter) -> StreamTiming:
    """Consume a streaming chat/completions response (a ``requests`` response opened with
    ``stream=True``) and time it. ``started`` is when the request was sent."""
    timing = StreamTiming(status=response.status_code, site=response.headers.get("x-spillway-site"))
    if response.status_code != 200:
        timing.error = response.text[:200]
        timing.e2e_ms = (clock() - started) * 1000
        return timing
    last_token_at = None
    for payload in sse_payloads(response.iter_content(chunk_size=None)):
        now = clock()
        if payload == b"[DONE]":
            timing.done = True
            break
        event = json.loads(payload)
        if "error" in event:
            timing.error = event["error"].get("message", "error event")
            break
        if event.get("usage"):
            timing.output_tokens = event["usage"].get("completion_tokens", timing.output_tokens)
            timing.prompt_tokens = event["usage"].get("prompt_tokens", timing.prompt_tokens)
        choices = event.get("choices") or []
        if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
            if timing.ttft_ms is None:
                timing.ttft_ms = (now - started) * 1000
            else:
                timing.token_gaps_ms.append((now - last_token_at) * 1000)
            last_token_at = now
    timing.e2e_ms = (clock() - started) * 1000
    if not timing.done and timing.error is None:
        timing.error = "stream ended without [DONE]"
    return timing
