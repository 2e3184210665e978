"""Semantic routing: a model alias (``auto``) whose requests go to the target their prompt is most like."""

from __future__ import annotations

from pydantic import Field, model_validator

from serve_app.config.base import Strict


class SemanticTarget(Strict):
    model: str = Field(description="Model id the target's requests run on (a local model or one on an external site).")
    description: str = Field(
        description="What the target is for, in a sentence or two; its embedding is one of the target's anchors.")
    examples: list[str] = Field(
        default_factory=list, description="Typical prompts of the target; each one's embedding is an anchor too.")
    confidential_fallback: str | None = Field(
        default=None,
        description="Model for prompts this target's model may not see (their data class is above every site the "
        "model runs on, e.g. confidential text routed to a model that lives only on an external API). "
        "Without one, such a prompt gets 403.")


class SemanticRouteConfig(Strict):
    """A model alias that picks one of ``targets`` per chat or completions request: the prompt's
    embedding (the last user message, at most ``max_prompt_chars``) against each target's anchors
    (its description and examples), cosine similarity, best anchor per target. Below
    ``threshold`` the ``default`` target takes it. Anchors are embedded once, at start-up."""

    embedding_model: str = Field(description="Embedding model (engine.runner: pooling) that embeds prompts and anchors.")
    targets: dict[str, SemanticTarget] = Field(description="Target name -> model, description, examples.")
    default: str = Field(description="Target that takes prompts no target matches with at least `threshold`.")
    threshold: float = Field(
        default=0.15, ge=-1, le=1,
        description="Least cosine similarity to a target's best anchor that routes there (MiniLM scores short "
        "prompts against on-topic anchors at about 0.2-0.5; benchmarks/semantic_routing.py measures it).")
    max_prompt_chars: int = Field(
        default=2_000, gt=0, description="Characters of the prompt (its end) that are embedded to route it.")
    embed_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Longest a request waits for its prompt's embedding; past it (or when the embedding model "
        "fails) it goes to the default target, and the route says why.")

    @model_validator(mode="after")
    def _default_is_a_target(self) -> "SemanticRouteConfig":
        if not self.targets:
            raise ValueError("a semantic route needs at least one target")
        if self.default not in self.targets:
            raise ValueError(f"default {self.default!r} is not one of the targets {sorted(self.targets)}")
        return self
