"""Stage: the request's data class, which decides where it may run (fail closed)."""

from __future__ import annotations

from serve_app.pipeline.context import RequestContext
from serve_app.policy.classify import CLASSIFIER_ERROR, Classification, DataClass, Finding, classify


class ClassifyStage:
    """The request's data class: declared (header, else the key's default, else the router's), raised by what the scan found,
    by content that could not be scanned (unless the client declared a class), and to
    confidential when the scan itself failed. Any error here also means confidential."""

    name = "classify"

    def __init__(self, default_class: DataClass, opaque_class: DataClass):
        self._default = default_class
        self._opaque = opaque_class

    async def run(self, ctx: RequestContext) -> None:
        with ctx.trace.child("spillway.classify") as span:
            try:
                ctx.classification = self.decide(ctx)
            except Exception:  # noqa: BLE001 - fail closed
                declared = ctx.headers.declared_class or self._default
                ctx.classification = classify(declared, (Finding(CLASSIFIER_ERROR, DataClass.confidential),))
            if span is not None:
                span.set_attributes({"spillway.declared_class": ctx.classification.declared.name,
                                     "spillway.data_class": ctx.classification.data_class.name,
                                     "spillway.raised_by": ctx.classification.raised_by})
        ctx.trace.set(data_class=ctx.classification.data_class.name)
        if ctx.trace.recording and ctx.scan.preview:
            ctx.trace.record_content("gen_ai.prompt", ctx.scan.preview)

    def decide(self, ctx: RequestContext) -> Classification:
        declared = ctx.headers.declared_class
        default = self._default
        if ctx.principal is not None and ctx.principal.default_class is not None:
            default = ctx.principal.default_class  # the key's default class
        findings = list(ctx.scan.findings)
        if ctx.scan.scan_error:
            findings.append(Finding(CLASSIFIER_ERROR, DataClass.confidential))
        if declared is None:
            findings += [Finding(f"opaque:{kind}", self._opaque) for kind in ctx.shape.opaque]
        return classify(declared if declared is not None else default, tuple(findings))
