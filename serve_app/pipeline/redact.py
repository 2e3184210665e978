"""PII redaction: a tenant's policy may send an ``internal`` request that holds PII to any site
trusted with ``internal`` data (the cloud), with every PII value replaced by a placeholder, instead
of pinning it on-prem. The router puts the values back into the answer.

When it applies (``RedactStage``): the tenant's ``pii_policy`` is ``redact``, the request's class
was raised only by PII detectors (not by opaque content, a failed scan or too many candidates)
and its declared class is ``internal`` or lower. Every string of the body (and of its keys'
values) is normalised as the detectors see it, each valid match is replaced by ``[PII_<KIND>_<n>]``
(the same value, the same placeholder), and the detectors then run again on the result: anything
left, or any candidate budget run out, keeps the request pinned as it was (fail closed). The
request then has its declared class.

The mapping lives in the request's context only: never in a log line, a span, an audit record
(the audit keeps the forwarded body, which holds placeholders) or the response cache (redacted
requests are not cached).

Restoring (``Restorer``): a non-streamed answer's strings are restored in place. A stream's
content deltas are restored per choice, holding back a tail that may be the start of a
placeholder split across chunks, until the next delta or the choice's end.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

from serve_app.pipeline.context import RequestContext
from serve_app.pipeline.scan import ScanSpec, detector_set
from serve_app.policy.classify import DataClass, classify, normalize

INLINE_MAX_BYTES = 16_384
PLACEHOLDER = re.compile(r"\[PII_[A-Z0-9_]{1,40}_\d{1,6}\]")
MAX_PLACEHOLDER_CHARS = 56


@dataclass
class Redaction:
    values: dict[str, str] = field(default_factory=dict)  # placeholder -> the original value

    def restore(self, text: str) -> str:
        return PLACEHOLDER.sub(lambda m: self.values.get(m.group(0), m.group(0)), text)


class RedactStage:
    name = "redact"

    def __init__(self, spec: ScanSpec):
        self.spec = spec

    async def run(self, ctx: RequestContext) -> None:
        rules = ctx.principal.tenant_rules if ctx.principal is not None else None
        c = ctx.classification
        if rules is None or rules.pii_policy != "redact" or not c.findings or c.declared > DataClass.internal:
            return
        detectors = {d.name for d in detector_set(self.spec).detectors}
        if any(f.detector not in detectors for f in c.findings):  # opaque content, a failed scan, too many candidates
            return
        rest = ctx.scan.rest
        if len(rest) > INLINE_MAX_BYTES:  # bounded work (RE2, candidate budgets), but not on the loop
            redacted = await asyncio.to_thread(redact, rest, self.spec)
        else:
            redacted = redact(rest, self.spec)
        if redacted is None:
            return
        rest, redaction = redacted
        ctx.scan.rest = rest
        ctx.redaction = redaction
        ctx.classification = classify(c.declared, ())
        ctx.trace.set(redacted_values=len(redaction.values))


def redact(rest: bytes, spec: ScanSpec) -> tuple[bytes, Redaction] | None:
    """The body with every PII value replaced, or ``None`` when that cannot be done safely."""
    body = json.loads(rest)
    detectors = detector_set(spec).detectors
    redaction = Redaction()
    by_value: dict[str, str] = {}
    counts: dict[str, int] = {}
    failed = False

    def clean(text: str) -> str:
        nonlocal failed
        text = normalize(text)
        spans: list[tuple[int, int, str]] = []
        for detector in detectors:
            found = detector.spans(text, detector.budget())
            if found is None:
                failed = True
                return text
            spans += [(start, end, detector.name) for start, end in found]
        out, at = [], 0
        for start, end, kind in sorted(spans):
            if start < at:
                continue  # overlaps a value already replaced
            value = text[start:end]
            placeholder = by_value.get(value)
            if placeholder is None:
                counts[kind] = counts.get(kind, 0) + 1
                placeholder = f"[PII_{kind.upper()}_{counts[kind]}]"
                by_value[value] = placeholder
                redaction.values[placeholder] = value
            out += [text[at:start], placeholder]
            at = end
        return "".join(out) + text[at:]

    def walk(value):
        if isinstance(value, str):
            return clean(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            if any(normalize(k) != k or detector_set(spec).scan([k]) for k in value):
                raise ValueError("PII in a key")
            return {k: walk(v) for k, v in value.items()}
        return value

    try:
        cleaned = walk(body)
    except ValueError:
        return None
    if failed or not redaction.values:
        return None
    rest = json.dumps(cleaned, ensure_ascii=False, separators=(",", ":")).encode()
    strings: list[str] = []
    _collect(cleaned, strings)
    if detector_set(spec).scan(strings):  # something is still there: stay pinned
        return None
    return rest, redaction


def _collect(value, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for v in value:
            _collect(v, out)
    elif isinstance(value, dict):
        out += list(value)
        for v in value.values():
            _collect(v, out)


def restore_body(body: bytes, redaction: Redaction) -> bytes:
    """A non-streamed answer with every placeholder in its strings replaced by its value."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    return json.dumps(_restore(answer, redaction), ensure_ascii=False, separators=(",", ":")).encode()


def _restore(value, redaction: Redaction):
    if isinstance(value, str):
        return redaction.restore(value)
    if isinstance(value, list):
        return [_restore(v, redaction) for v in value]
    if isinstance(value, dict):
        return {k: _restore(v, redaction) for k, v in value.items()}
    return value


class StreamRestorer:
    """Restores placeholders in a stream's content deltas, across chunk boundaries."""

    def __init__(self, redaction: Redaction):
        self.redaction = redaction
        self.held: dict[tuple[int, str], str] = {}  # (choice, field) -> a tail not yet sent

    def feed(self, events: bytes) -> bytes:
        out = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            if not event.startswith(b"data: {"):
                out.append(event + b"\n\n")
                continue
            try:
                data = json.loads(event[6:])
            except ValueError:
                out.append(event + b"\n\n")
                continue
            for choice in data.get("choices") or ():
                index = choice.get("index", 0)
                ending = choice.get("finish_reason") is not None
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    for name in ("content", "reasoning_content"):
                        if isinstance(delta.get(name), str) or (ending and (index, name) in self.held):
                            delta[name] = self._take(index, name, delta.get(name) or "", ending)
                elif isinstance(choice.get("text"), str) or (ending and (index, "text") in self.held):
                    choice["text"] = self._take(index, "text", choice.get("text") or "", ending)
            out.append(b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n")
        return b"".join(out)

    def _take(self, index: int, name: str, text: str, ending: bool) -> str:
        text = self.held.pop((index, name), "") + text
        if not ending:
            start = text.rfind("[")
            if start >= 0 and len(text) - start < MAX_PLACEHOLDER_CHARS and "]" not in text[start:] \
                    and _could_start(text[start:]):
                self.held[(index, name)] = text[start:]
                text = text[:start]
        return self.redaction.restore(text)


def _could_start(tail: str) -> bool:
    """``tail`` (from a ``[``) may be the beginning of a placeholder."""
    prefix = "[PII_"
    if len(tail) <= len(prefix):
        return prefix.startswith(tail)
    return tail.startswith(prefix) and re.fullmatch(r"[A-Z0-9_]*", tail[len(prefix):]) is not None
