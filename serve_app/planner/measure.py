"""Measure an engine profile on a running Spillway: the planner's figures for one model, taken
through the router (so its overhead is part of the time to first token, as in production).

- Time per output token against batch size: ``b`` streams at once (``b`` = 1, 2, 4, ... up to the
  engine's ``max_num_seqs``), each ``max_tokens`` long with ``ignore_eos``. A stream's figure is
  (time to its last token - the unloaded time to first token) / (its tokens - 1): the whole
  stream, as the simulator models it (first token, then one step per token). Gaps between SSE
  events would not do: an event may carry several tokens or none, and a client starved of CPU
  next to the engines reads late and sees a stream's tokens arrive at once. The batch's figure is
  the median over streams and rounds.
- What a busy replica adds to the first token: requests sent one at a time while ``b - 1`` long
  streams decode (``b`` below the batch limit), their time to first token over the unloaded one.
- Time in the router's queue (``x-spillway-queue-ms``) is taken out of every figure: queueing is
  what the simulator works out itself, from the router's own scheduler.
- Prefill speed: the time to first token of a long prompt against a short one, one at a time
  (prompt sizes from the usage the server reports). Every prompt is drawn afresh, so the
  engine's prefix cache cannot skip the prefill being timed.
- Only streams served on ``site`` count: a stream that spilled elsewhere is left out and reported.

The machine should be otherwise idle: what the profile says is what one replica does alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from serve_app.planner.profile import EngineProfile, batch_points

JOIN_SETTLE_S = 0.5
TTFT_TOKENS = 8  # (a token or two may decode to no text yet: ask for a few, time the first)
WORDS = "river lake stream spill dam flood basin delta channel canal reservoir weir".split()


@dataclass
class StreamSample:
    ttft_ms: float | None
    decode_ms: float | None  # first content event to last
    site: str | None
    prompt_tokens: int | None
    completion_tokens: int | None = None
    queue_ms: float = 0.0  # its wait in the router's queue (x-spillway-queue-ms): the simulator's own part
    error: str | None = None

    @property
    def engine_ttft_ms(self) -> float | None:
        return None if self.ttft_ms is None else max(0.0, self.ttft_ms - self.queue_ms)

    def itl_ms(self, base_ttft_ms: float) -> float | None:
        """Time per token after an unloaded first token of ``base_ttft_ms`` (None: it cannot say)."""
        if self.ttft_ms is None or self.decode_ms is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return max(0.0, self.engine_ttft_ms + self.decode_ms - base_ttft_ms) / (self.completion_tokens - 1)


@dataclass
class Measurement:
    itl_ms: dict[int, float] = field(default_factory=dict)
    ttft_extra_ms: dict[int, float] = field(default_factory=dict)  # batch -> median TTFT over the unloaded one
    ttft_short_ms: float | None = None
    ttft_long_ms: float | None = None
    prompt_tokens: tuple[int, int] = (0, 0)
    left_out: dict[str, int] = field(default_factory=dict)  # streams served elsewhere or failed, by batch

    def profile(self, name: str, max_num_seqs: int, source: str) -> EngineProfile:
        short, long = self.prompt_tokens
        extra_ms = (self.ttft_long_ms or 0) - (self.ttft_short_ms or 0)
        # A prefill too fast to see over the noise (tiny models) is taken as 1 ms per 1,000 tokens.
        prefill = (long - short) / (extra_ms / 1000) if extra_ms > 0 and long > short else 1_000_000.0
        overhead = max(0.0, (self.ttft_short_ms or 0) - 1000 * short / prefill)
        return EngineProfile(name=name, source=source, max_num_seqs=max_num_seqs,
                             prefill_tokens_per_s=round(prefill, 1), ttft_overhead_ms=round(overhead, 1),
                             itl_ms={b: round(ms, 2) for b, ms in sorted(self.itl_ms.items())},
                             ttft_extra_ms={b: round(ms, 1) for b, ms in sorted(self.ttft_extra_ms.items())} or {1: 0.0})


def _prompt(words: int) -> str:
    rng = random.Random()  # (fresh words every time: no prefix-cache hit)
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _stream(client, url: str, model: str, words: int, max_tokens: int, headers: dict) -> StreamSample:
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(words)}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            site = response.headers.get("x-spillway-site")
            try:
                queue_ms = float(response.headers.get("x-spillway-queue-ms") or 0.0)
            except ValueError:
                queue_ms = 0.0
            if response.status_code != 200:
                return StreamSample(None, None, site, None, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    first = first if first is not None else now
                    last = now
    except Exception as exc:  # noqa: BLE001 - a failed stream is reported and left out, never fatal
        return StreamSample(None, None, None, None, error=f"{type(exc).__name__}: {exc}")
    if first is None:
        return StreamSample(None, None, site, None, error="no content")
    return StreamSample((first - started) * 1000, (last - first) * 1000, site, usage.get("prompt_tokens"),
                        usage.get("completion_tokens"), queue_ms)


async def _joining(client, url: str, model: str, words: int, max_tokens: int, headers: dict, running: int,
                   site: str, probes: int) -> list[float]:
    """Times to first token of requests sent one by one while ``running`` long streams decode."""
    background = [asyncio.create_task(_stream(client, url, model, words, 4 * max_tokens, headers))
                  for _ in range(running)]
    await asyncio.sleep(JOIN_SETTLE_S)  # (let them be admitted and past their own first token)
    ttfts = []
    for _ in range(probes):
        sample = await _stream(client, url, model, words, TTFT_TOKENS, headers)
        if sample.error is None and sample.site == site and sample.ttft_ms is not None:
            ttfts.append(sample.engine_ttft_ms)
    await asyncio.gather(*background)
    return ttfts


async def measure(base_url: str, model: str, site: str, max_num_seqs: int, *, api_key: str | None = None,
                  max_tokens: int = 64, rounds: int = 3, short_words: int = 8, long_words: int = 400,
                  log=print) -> Measurement:
    import httpx

    url = f"{base_url.rstrip('/')}/v1/chat/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    result = Measurement()
    batches = batch_points(max_num_seqs)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        await _stream(client, url, model, short_words, 4, headers)  # (warm the path up)
        alone = [await _stream(client, url, model, short_words, TTFT_TOKENS, headers) for _ in range(max(3, rounds))]
        base_ttft = statistics.median([s.engine_ttft_ms for s in alone if s.ttft_ms is not None] or [0.0])
        for batch in batches:
            itls, ttfts_here, left_out = [], [], 0
            for _ in range(rounds):
                samples = await asyncio.gather(*(_stream(client, url, model, short_words, max_tokens, headers)
                                                 for _ in range(batch)))
                for sample in samples:
                    itl = sample.itl_ms(base_ttft)
                    if sample.error or sample.site != site or itl is None:
                        left_out += 1
                    else:
                        itls.append(itl)
            # A new request joining ``batch - 1`` running ones, as in steady traffic. Not at the batch
            # limit: there a newcomer waits for a sequence to finish, which is queueing, and the
            # simulator's scheduler works that out itself (the last point holds past it).
            if 1 < batch < max_num_seqs:
                ttfts_here = await _joining(client, url, model, short_words, max_tokens, headers, batch - 1, site, rounds)
            if itls:
                result.itl_ms[batch] = statistics.median(itls)
                if 1 < batch < max_num_seqs and ttfts_here:
                    result.ttft_extra_ms[batch] = max(0.0, statistics.median(ttfts_here) - base_ttft)
                elif batch == 1:
                    result.ttft_extra_ms[batch] = 0.0
            if left_out:
                result.left_out[f"batch {batch}"] = left_out
            log(f"  batch {batch:3d}: time per output token {result.itl_ms.get(batch, float('nan')):.2f} ms, "
                f"first token {result.ttft_extra_ms.get(batch, float('nan')):.1f} ms later than alone"
                + (f" ({left_out} streams left out: served elsewhere or failed)" if left_out else ""))
        probe = await _stream(client, url, model, long_words, TTFT_TOKENS, headers)
        while probe.error == "HTTP 400" and long_words > 4 * short_words:  # (longer than the model takes)
            long_words //= 2
            probe = await _stream(client, url, model, long_words, TTFT_TOKENS, headers)
        ttfts: dict[int, list[float]] = {short_words: [], long_words: []}
        tokens: dict[int, int] = {}
        for _ in range(max(3, rounds)):
            for words in (short_words, long_words):
                sample = await _stream(client, url, model, words, TTFT_TOKENS, headers)
                if sample.error is None and sample.site == site and sample.ttft_ms is not None:
                    ttfts[words].append(sample.ttft_ms)
                    tokens[words] = sample.prompt_tokens or tokens.get(words, 0)
        if not result.itl_ms or not ttfts[short_words] or not ttfts[long_words]:
            raise RuntimeError(f"no stream of {model} was served on {site!r}: is the site up, and does it serve "
                               f"{model}? (left out: {result.left_out})")
        result.ttft_short_ms = statistics.median(ttfts[short_words])
        result.ttft_long_ms = statistics.median(ttfts[long_words])
        result.prompt_tokens = (tokens.get(short_words, 0), tokens.get(long_words, 0))
        log(f"  TTFT {result.ttft_short_ms:.1f} ms at {result.prompt_tokens[0]} prompt tokens, "
            f"{result.ttft_long_ms:.1f} ms at {result.prompt_tokens[1]}")
    return result
