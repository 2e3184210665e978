"""Scan one request body: strict decoding, the shape checks, and PII detection over every string.

``scan_request`` is a pure function of the body's bytes and a ``ScanSpec``, so the parse stage can
run it inline for small bodies and in a helper process for large ones: a hostile 1 MiB body then
costs the router's event loop only the hand-over, never the parse or the matching.

What it guarantees:
- the body is UTF-8 JSON with no NaN or Infinity, an object, nested at most ``max_json_depth``
  levels (a body nested 950 deep used to parse and then fail to serialise: a 500);
- the fields the router reads have the right types (``schema.check_shape``);
- every string in the body (values and keys: messages, tool definitions and calls, names,
  prompts, anything vLLM might render into a prompt) is normalised and scanned by the detectors;
- content that cannot be scanned as text (token ids, images, audio, embeddings) is reported as
  ``opaque``, so the classify stage can fail closed on it;
- a detector that raises is reported as ``scan_error`` (the classify stage fails closed), never
  as "nothing found".

The body the engine gets is re-encoded without ``model`` and ``stream_options`` (``rest``): the
router sets those two itself (split variants, usage) and splices them in without parsing again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from serve_app.pipeline.schema import (
    ENDPOINT_CHAT,
    ENDPOINT_COMPLETIONS,
    TEXT_PART_TYPES,
    RequestShape,
    ShapeError,
    ShapeLimits,
    check_shape,
)
from serve_app.policy.classify import DataClass, Finding, normalize
from serve_app.policy.detectors import DEFAULT_DETECTORS, DetectorSet

ROUTER_SET_KEYS = ("model", "stream_options")
_NO_TEXT = frozenset({int, bool, type(None)})
_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


@dataclass(frozen=True)
class ScanSpec:
    """Everything a scan depends on (picklable: it travels to the helper process)."""

    limits: ShapeLimits = field(default_factory=ShapeLimits)
    max_json_depth: int = 64
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    detector_params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    preview_chars: int = 0  # >0: keep the start of the prompt text (only for tracing.record_content)
    route_chars: int = 0  # >0: keep the end of the last user message (semantic routing embeds it)


@dataclass
class ScanResult:
    status: int = 200  # 400 when the body is malformed; the fields below are then unset
    message: str = ""
    param: str | None = None
    shape: RequestShape | None = None
    rest: bytes = b"{}"
    findings: tuple[Finding, ...] = ()
    scan_error: str | None = None
    text_chars: int = 0
    preview: str | None = None
    route_text: str | None = None


class _Malformed(ValueError):
    pass


_DETECTOR_SETS: dict[tuple, DetectorSet] = {}


def detector_set(spec: ScanSpec) -> DetectorSet:
    """Built once per spec and process (the helper process keeps its own)."""
    key = (spec.detectors, spec.detector_params)
    found = _DETECTOR_SETS.get(key)
    if found is None:
        params = {name: dict(values) for name, values in spec.detector_params}
        found = _DETECTOR_SETS[key] = DetectorSet.from_names(spec.detectors, params)
    return found


def scan_request(raw: bytes, endpoint: str, spec: ScanSpec) -> ScanResult:
    try:
        body = _DECODER.decode(raw)
    except RecursionError:
        return ScanResult(400, f"request body is nested deeper than {spec.max_json_depth} levels")
    except UnicodeDecodeError:
        return ScanResult(400, "request body is not valid UTF-8")
    except (msgspec.DecodeError, ValueError) as exc:
        detail = str(exc)[:120] if isinstance(exc, msgspec.DecodeError) else "malformed"
        return ScanResult(400, f"request body is not valid JSON ({detail}; NaN and Infinity are not JSON)")
    if not isinstance(body, dict):
        return ScanResult(400, "request body must be a JSON object")
    try:
        values, keys = _strings(body, spec.max_json_depth)
    except _Malformed as exc:
        return ScanResult(400, str(exc))
    try:
        shape = check_shape(endpoint, body, spec.limits)
    except ShapeError as exc:
        return ScanResult(400, exc.message, exc.param)
    rest = _ENCODER.encode({k: v for k, v in body.items() if k not in ROUTER_SET_KEYS})
    result = ScanResult(shape=shape, rest=rest, text_chars=sum(map(len, values)) + sum(map(len, keys)))
    try:
        result.findings = detector_set(spec).scan(normalize(text) for text in (*values, *keys))
    except Exception as exc:  # noqa: BLE001 - reported, and the classify stage fails closed on it
        result.scan_error = type(exc).__name__
    if spec.preview_chars:
        result.preview = "\n".join(values)[:spec.preview_chars]
    if spec.route_chars:
        result.route_text = route_text(endpoint, body, spec.route_chars)
    return result


def route_text(endpoint: str, body: dict, max_chars: int) -> str | None:
    """What semantic routing embeds: the last user message's text (chat), or the first text prompt
    (completions), its last ``max_chars`` characters. Call on a body that passed ``check_shape``."""
    text = None
    if endpoint == ENDPOINT_CHAT:
        for message in reversed(body["messages"]):
            if message.get("role") == "user":
                content = message.get("content")
                text = content if isinstance(content, str) else "\n".join(
                    part["text"] for part in content or () if part.get("type") in TEXT_PART_TYPES)
                break
    elif endpoint == ENDPOINT_COMPLETIONS:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else (prompt[0] if prompt and isinstance(prompt[0], str) else None)
    return text[-max_chars:] if text else None


def _strings(body: dict, max_depth: int) -> tuple[list[str], list[str]]:
    """Every string value and every key in ``body``, iteratively (no recursion to exhaust).
    Raises ``_Malformed`` past ``max_depth`` levels or for a non-finite number."""
    values: list[str] = []
    keys: list[str] = []
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise _Malformed(f"request body is nested deeper than {max_depth} levels")
        if type(node) is dict:
            keys.extend(node)
            items = node.values()
        else:
            items = node
        kinds = set(map(type, items))
        if kinds <= _NO_TEXT:
            continue
        if kinds == {str}:
            values.extend(items)
            continue
        for item in items:
            kind = type(item)
            if kind is str:
                values.append(item)
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is float and not math.isfinite(item):
                raise _Malformed("request body holds a number out of range")
    return values, keys


def compose_body(rest: bytes, model: str, stream_options: dict | None) -> bytes:
    """The engine's body: ``rest`` with the router's ``model`` and ``stream_options`` spliced in."""
    head = b'{"model":' + _ENCODER.encode(model)
    if stream_options is not None:
        head += b',"stream_options":' + _ENCODER.encode(stream_options)
    return head + (b"}" if rest == b"{}" else b"," + rest[1:])


# ---- wire form, between the router and its scan helper (msgpack: no pickle of hostile-derived data) ----


def result_to_wire(result: ScanResult) -> dict:
    shape = result.shape
    return {
        "status": result.status, "message": result.message, "param": result.param,
        "shape": None if shape is None else [shape.model, shape.stream, shape.stream_options, shape.n,
                                             shape.prompts, shape.max_tokens, shape.user, list(shape.opaque),
                                             shape.deterministic],
        "rest": result.rest, "findings": [[f.detector, int(f.data_class)] for f in result.findings],
        "scan_error": result.scan_error, "text_chars": result.text_chars, "preview": result.preview,
        "route_text": result.route_text,
    }


def result_from_wire(data: dict) -> ScanResult:
    shape = data["shape"]
    return ScanResult(
        status=int(data["status"]), message=str(data["message"]), param=data["param"],
        shape=None if shape is None else RequestShape(str(shape[0]), bool(shape[1]), shape[2], int(shape[3]),
                                                       int(shape[4]), shape[5], shape[6], tuple(shape[7]),
                                                       bool(shape[8])),
        rest=bytes(data["rest"]),
        findings=tuple(Finding(str(name), DataClass(level)) for name, level in data["findings"]),
        scan_error=data["scan_error"], text_chars=int(data["text_chars"]), preview=data["preview"],
        route_text=data["route_text"],
    )


def spec_to_wire(spec: ScanSpec) -> dict:
    limits = spec.limits
    return {"limits": [limits.max_n, limits.max_prompts, limits.max_messages, limits.max_embedding_inputs],
            "max_json_depth": spec.max_json_depth,
            "detectors": list(spec.detectors),
            "detector_params": [[name, [[k, v] for k, v in values]] for name, values in spec.detector_params],
            "preview_chars": spec.preview_chars, "route_chars": spec.route_chars}


def spec_from_wire(data: dict) -> ScanSpec:
    return ScanSpec(ShapeLimits(*data["limits"]), data["max_json_depth"], tuple(data["detectors"]),
                    tuple((name, tuple((k, _frozen(v)) for k, v in values)) for name, values in data["detector_params"]),
                    data["preview_chars"], data["route_chars"])


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value
