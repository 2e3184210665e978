"""How long answers run, as the spill prediction needs it: output tokens per sequence to expect
from a request, learned from finished requests' usage.

- With ``max_tokens``: its learned share (answers' tokens / ``max_tokens``), but never less than
  the typical answer it allows. The share alone collapses when some clients ask for far more than
  they use (10**9 answered with 100 tokens teaches a share of 1e-7, and every other request would
  look one token long: the preferred site would look free and nothing would spill in time).
- ``max_tokens`` is bounded by the model's context as the engine bounds it (vLLM clamps a larger
  one to what the context leaves), so a huge one is neither endless nor a lesson.
- Without ``max_tokens``: the learned length of such answers (``assumed_output_tokens`` until
  measured).
"""

from __future__ import annotations

OUTPUT_EWMA_ALPHA = 0.1


class AnswerLengths:
    def __init__(self, assumed_tokens: int, context_tokens: int | None = None):
        self.context_tokens = context_tokens
        self.ratio = 1.0  # output tokens / max_tokens
        self.unbounded = float(assumed_tokens)  # output of requests without max_tokens
        self.typical = float(assumed_tokens)  # output of any request

    def bound(self, max_tokens: int | None) -> int | None:
        """What ``max_tokens`` can really mean: at least 1, at most the context. None: absent."""
        if max_tokens is None:
            return None
        return max(1, min(max_tokens, self.context_tokens) if self.context_tokens else max_tokens)

    def expected(self, max_tokens: int | None) -> int:
        bound = self.bound(max_tokens)
        if bound is None:
            return max(1, round(self.unbounded))
        return max(1, round(max(bound * self.ratio, min(bound, self.typical))))

    def observe(self, max_tokens: int | None, completion_tokens: int, sequences: int = 1) -> None:
        """A finished request: its completion tokens over all its ``sequences``."""
        per_sequence = completion_tokens / max(1, sequences)
        self.typical += OUTPUT_EWMA_ALPHA * (per_sequence - self.typical)
        bound = self.bound(max_tokens)
        if bound is not None:
            self.ratio += OUTPUT_EWMA_ALPHA * (min(1.0, per_sequence / bound) - self.ratio)
        else:
            self.unbounded += OUTPUT_EWMA_ALPHA * (per_sequence - self.unbounded)
