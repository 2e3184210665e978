"""Semantic routing's decision: which target a prompt's embedding is most like.

Each target has anchors: its description and its example prompts, embedded once (``anchor_texts``,
then ``set_anchor_vectors``). A prompt scores, per target, the cosine similarity of its best
anchor (nearest neighbour: a target whose prompts differ among themselves, such as "general",
is not averaged into a blur). The best target wins when its score reaches ``threshold``; the
default target takes everything else, and every choice says why (``RouteChoice.reason``).
Pure and synchronous: no Ray, no I/O, testable with any vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.config.semantic import SemanticRouteConfig

REASON_MATCH = "match"
REASON_BELOW_THRESHOLD = "below_threshold"
REASON_NO_TEXT = "no_text"  # nothing to embed (token ids only, or empty text)
REASON_EMBEDDING_UNAVAILABLE = "embedding_unavailable"


@dataclass(frozen=True)
class RouteChoice:
    alias: str
    target: str
    model: str
    score: float | None  # the winning target's best-anchor similarity; None when nothing was compared
    reason: str
    fallback_from: str | None = None  # the model the target names, when residency sent it elsewhere
    latency_ms: float | None = None  # what the routing step took (the prompt's embedding included)


class SemanticRouter:
    def __init__(self, alias: str, config: SemanticRouteConfig):
        self.alias = alias
        self.config = config
        self._anchors: list[tuple[str, str]] = []  # (target, text)
        for name, target in config.targets.items():
            self._anchors.append((name, target.description))
            self._anchors.extend((name, example) for example in target.examples)
        self._owners = np.array([name for name, _ in self._anchors])
        self._names = list(config.targets)
        self._matrix: np.ndarray | None = None  # one normalised row per anchor

    @property
    def ready(self) -> bool:
        return self._matrix is not None

    def anchor_texts(self) -> list[str]:
        return [text for _, text in self._anchors]

    def set_anchor_vectors(self, vectors) -> None:
        matrix = _normalised(np.asarray(vectors, dtype=np.float32))
        if matrix.shape[0] != len(self._anchors):
            raise ValueError(f"{self.alias}: {matrix.shape[0]} anchor vectors for {len(self._anchors)} anchors")
        self._matrix = matrix

    def scores(self, vector) -> dict[str, float]:
        """Best-anchor cosine similarity per target."""
        if self._matrix is None:
            raise RuntimeError(f"semantic route {self.alias!r}: anchors are not embedded yet")
        query = _normalised(np.asarray(vector, dtype=np.float32)[None, :])[0]
        similarity = self._matrix @ query
        return {name: float(similarity[self._owners == name].max()) for name in self._names}

    def choose(self, vector) -> RouteChoice:
        scores = self.scores(vector)
        best = max(self._names, key=lambda name: scores[name])
        if scores[best] >= self.config.threshold:
            return self._choice(best, scores[best], REASON_MATCH)
        return self._choice(self.config.default, scores[best], REASON_BELOW_THRESHOLD)

    def default_choice(self, reason: str) -> RouteChoice:
        return self._choice(self.config.default, None, reason)

    def _choice(self, target: str, score: float | None, reason: str) -> RouteChoice:
        return RouteChoice(self.alias, target, self.config.targets[target].model,
                           None if score is None else round(score, 4), reason)


def _normalised(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)
