"""Stage: resolve the model a request runs on (ids, split aliases)."""

from __future__ import annotations

from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.schema import ENDPOINT_EMBEDDINGS
from serve_app.policy.splits import TrafficSplit


def affinity_key(ctx: RequestContext) -> str | None:
    """Sticky key for splits and session affinity: the OpenAI ``user`` field, else ``x-session-id``."""
    return ctx.shape.user or ctx.headers.session


class ResolveStage:
    """The model the request runs on: an id, or a split alias resolved to one variant (sticky per
    user). Checks what only the model can tell: a request needs no more sequences than one engine
    runs at once."""

    name = "resolve"

    def __init__(self, models: dict[str, ModelConfig], splits: dict[str, TrafficSplit]):
        self._models = models
        self._splits = splits

    async def run(self, ctx: RequestContext) -> None:
        ctx.requested_model = model_id = ctx.shape.model
        split = self._splits.get(model_id)
        if ctx.route is not None:  # a semantic alias: the semantic route stage picked the model
            model_id = ctx.route.model
        elif split is not None:
            ctx.split = split
            model_id = split.choose(affinity_key(ctx))
            ctx.trace.set(requested_model=split.alias, variant=model_id)
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(f"The model '{model_id[:256]}' does not exist", param="model")
        pooling = model.engine.runner == "pooling"
        if pooling != (ctx.endpoint == ENDPOINT_EMBEDDINGS):
            what = "an embedding model: use /v1/embeddings" if pooling else "not an embedding model"
            raise InvalidRequest(f"model '{model_id}' is {what}", param="model")
        if pooling:
            ctx.sequences = min(ctx.shape.prompts, model.engine.max_num_seqs)
        elif ctx.shape.sequences > model.engine.max_num_seqs:
            raise InvalidRequest(
                f"the request needs {ctx.shape.sequences} sequences (n x prompts); model '{model_id}' runs at most "
                f"{model.engine.max_num_seqs} per engine", param="n")
        else:
            ctx.sequences = ctx.shape.sequences
        ctx.model = model_id
        ctx.trace.set(model=model_id, stream=ctx.stream)
