"""Embeddings the router needs itself (semantic routing), through the same admission, residency
and dispatch as a client's ``/v1/embeddings`` request.

An internal request is a ``RequestContext`` of its own: it waits in the embedding model's queue,
takes a lease and is placed on a site that may see its data class (the prompt's), so a
confidential prompt is embedded on-prem or not at all. It owns its lease and connection like any
request and gives them back in ``close``; it is not metered to the tenant (the routing step is the
platform's overhead) and has no trace of its own (the caller's span covers it).
"""

from __future__ import annotations

import json
import uuid

import msgspec
import numpy as np

from serve_app.config import ModelConfig
from serve_app.observe.tracing import NO_TRACE
from serve_app.pipeline.context import RequestContext, RequestHeaders
from serve_app.pipeline.scan import ScanResult
from serve_app.pipeline.schema import ENDPOINT_EMBEDDINGS, RequestShape
from serve_app.policy.classify import Classification

_ENCODER = msgspec.json.Encoder()


class EmbeddingFailed(RuntimeError):
    """The embedding model answered something other than embeddings."""


class PipelineEmbedder:
    def __init__(self, admit, dispatch, models: dict[str, ModelConfig]):
        self._admit = admit
        self._dispatch = dispatch
        self._models = models

    async def embed(self, model_id: str, texts: list[str], classification: Classification, *,
                    onprem_only: bool = False, priority: int = 0) -> np.ndarray:
        """One row per text. Raises what admission and dispatch raise (a 429/503 as ``SpillwayError``),
        or ``EmbeddingFailed``."""
        shape = RequestShape(model_id, False, None, 1, len(texts), 1, None, ())
        ctx = RequestContext(
            ENDPOINT_EMBEDDINGS, RequestHeaders(request_id=f"route-{uuid.uuid4().hex}", priority=priority), NO_TRACE,
            scan=ScanResult(shape=shape, rest=_ENCODER.encode({"input": texts})), model=model_id,
            classification=classification, onprem_only=onprem_only,
            sequences=min(len(texts), self._models[model_id].engine.max_num_seqs))
        try:
            await self._admit.run(ctx)
            await self._dispatch.run(ctx)
            reply = ctx.reply
            ctx.engine_done()
            if reply.status != 200 or reply.body is None:
                raise EmbeddingFailed(f"embedding model {model_id!r} answered {reply.status}")
            try:
                data = sorted(json.loads(reply.body)["data"], key=lambda item: item["index"])
                vectors = np.array([item["embedding"] for item in data], dtype=np.float32)
            except (ValueError, KeyError, TypeError) as exc:
                raise EmbeddingFailed(f"embedding model {model_id!r} answered no embeddings: {exc!r}") from None
            if vectors.ndim != 2 or vectors.shape[0] != len(texts):
                raise EmbeddingFailed(f"embedding model {model_id!r} answered {vectors.shape} for {len(texts)} texts")
            return vectors
        finally:
            ctx.close()
