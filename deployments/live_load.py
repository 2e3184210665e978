"""An engine replica's live load as vLLM's scheduler reports it every engine step: sequences
running and waiting, KV-cache use, and recent step times. The router reads it through the
replica's load reports (``stats``) to place requests and to predict when sequences free."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STEP_EWMA_ALPHA = 0.2


@dataclass
class LiveLoad:
    """The replica's latest scheduler view and step times, refreshed by vLLM every engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    itl_ms: float | None = None  # recent time between two tokens of one sequence
    ttft_ms: float | None = None  # recent time from arrival to a sequence's first token
    updated_at: float = field(default_factory=time.monotonic)

    def observe_steps(self, itls_s: list[float], ttfts_s: list[float]) -> None:
        for values, name in ((itls_s, "itl_ms"), (ttfts_s, "ttft_ms")):
            if values:
                sample = 1000 * sum(values) / len(values)
                last = getattr(self, name)
                setattr(self, name, sample if last is None else last + STEP_EWMA_ALPHA * (sample - last))


def live_load_logger(load: LiveLoad):
    """A vLLM stat-logger factory that copies scheduler stats and step times into ``load``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LiveLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is not None:
                load.observe_steps(iteration_stats.inter_token_latencies_iter,
                                   iteration_stats.time_to_first_tokens_iter)
            if scheduler_stats is None:
                return
            load.running = scheduler_stats.num_running_reqs
            load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            load.updated_at = time.monotonic()

        def log_engine_initialized(self):
            pass

    return _LiveLoadLogger
