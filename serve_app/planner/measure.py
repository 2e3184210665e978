"""Measure an engine profile on a running Spillway: the planner's figures for one model, taken
through the router (so its overhead is part of the time to first token, as in production).

- Time per output token against batch size: ``b`` streams at once (``b`` = 1, 2, 4, ... up to the
  engine's ``max_num_seqs``), each ``max_tokens`` long with ``ignore_eos``; a stream's figure is the
  mean gap between its content events, the batch's the median over streams and rounds.
- Prefill speed: the time to first token of a long prompt against a short one, one at a time
  (prompt sizes from the usage the server reports).
- Only streams served on ``site`` count: a stream that spilled elsewhere is left out and reported.

The machine should be otherwise idle: what the profile says is what one replica does alone.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

from serve_app.planner.profile import EngineProfile

WORDS = "river lake stream spill dam flood basin delta channel canal reservoir weir".split()


@dataclass
class StreamSample:
    ttft_ms: float | None
    gaps_ms: list[float]
    site: str | None
    prompt_tokens: int | None
    error: str | None = None

    @property
    def itl_ms(self) -> float | None:
        return statistics.fmean(self.gaps_ms) if self.gaps_ms else None


@dataclass
class Measurement:
    itl_ms: dict[int, float] = field(default_factory=dict)
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
                             itl_ms={b: round(ms, 2) for b, ms in sorted(self.itl_ms.items())})


async def _stream(client, url: str, model: str, words: int, max_tokens: int, headers: dict) -> StreamSample:
    body = {"model": model, "messages": [{"role": "user", "content": " ".join(WORDS[i % len(WORDS)] for i in range(words))}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, last, gaps, prompt_tokens = None, None, [], None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            site = response.headers.get("x-spillway-site")
            if response.status_code != 200:
                return StreamSample(None, [], site, None, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event.get("usage"):
                    prompt_tokens = event["usage"].get("prompt_tokens")
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    if ttft is None:
                        ttft = (now - started) * 1000
                    else:
                        gaps.append((now - last) * 1000)
                    last = now
    except Exception as exc:  # noqa: BLE001 - a failed stream is reported and left out, never fatal
        return StreamSample(None, [], None, None, f"{type(exc).__name__}: {exc}")
    return StreamSample(ttft, gaps, site, prompt_tokens)


async def measure(base_url: str, model: str, site: str, max_num_seqs: int, *, api_key: str | None = None,
                  max_tokens: int = 64, rounds: int = 3, short_words: int = 8, long_words: int = 1500,
                  log=print) -> Measurement:
    import httpx

    url = f"{base_url.rstrip('/')}/v1/chat/completions"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    result = Measurement()
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_num_seqs} | {max_num_seqs})
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        await _stream(client, url, model, short_words, 4, headers)  # (warm the path up)
        for batch in batches:
            itls, left_out = [], 0
            for _ in range(rounds):
                samples = await asyncio.gather(*(_stream(client, url, model, short_words, max_tokens, headers)
                                                 for _ in range(batch)))
                for sample in samples:
                    if sample.error or sample.site != site or sample.itl_ms is None:
                        left_out += 1
                    else:
                        itls.append(sample.itl_ms)
            if itls:
                result.itl_ms[batch] = statistics.median(itls)
            if left_out:
                result.left_out[f"batch {batch}"] = left_out
            log(f"  batch {batch:3d}: time per output token {result.itl_ms.get(batch, float('nan')):.2f} ms"
                + (f" ({left_out} streams left out: served elsewhere or failed)" if left_out else ""))
        ttfts: dict[int, list[float]] = {short_words: [], long_words: []}
        tokens: dict[int, int] = {}
        for _ in range(max(3, rounds)):
            for words in (short_words, long_words):
                sample = await _stream(client, url, model, words, 1, headers)
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
