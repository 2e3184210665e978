"""The shape of an OpenAI request body, as far as the router relies on it.

vLLM validates every field again with its own protocol models; the router checks the fields it
reads and the structure its scan walks, so that a malformed body is a 400 with the offending
parameter, never a 500 (``{"messages": 5}`` or ``"tool_calls": true`` used to be). Each check
names the parameter path (``messages[3].tool_calls[0].function.arguments``).

``sequences`` is what the request occupies in an engine: vLLM schedules ``n`` sequences per
prompt, and a completions request may carry a batch of prompts. An embeddings request is one
pooling step per input, which vLLM batches: it counts one sequence per input, at most
``max_num_seqs`` (vLLM runs the rest of a large batch as the first ones finish).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ENDPOINT_CHAT = "chat"
ENDPOINT_COMPLETIONS = "completions"
ENDPOINT_EMBEDDINGS = "embeddings"
EMBEDDING_FORMATS = ("float", "base64")
TEXT_PART_TYPES = frozenset({"text", "input_text"})
MAX_MODEL_NAME_CHARS = 256
MAX_USER_CHARS = 512


class ShapeError(ValueError):
    """The body does not have the shape the API requires; ``param`` names where."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class RequestShape:
    model: str
    stream: bool
    stream_options: dict | None
    n: int
    prompts: int
    max_tokens: int | None
    user: str | None
    opaque: tuple[str, ...]  # content the router cannot read as text (token ids, images, ...)
    deterministic: bool = False  # temperature 0 or a fixed seed: the same request gets the same answer

    @property
    def sequences(self) -> int:
        return self.n * self.prompts


@dataclass(frozen=True)
class ShapeLimits:
    max_n: int = 16
    max_prompts: int = 64
    max_messages: int = 4096
    max_embedding_inputs: int = 256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: dict, key: str, kind: type | tuple, what: str) -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ShapeError(f"'{key}' must be {what}", key)
    return value


def check_shape(endpoint: str, body: dict, limits: ShapeLimits = ShapeLimits()) -> RequestShape:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ShapeError("'model' is required and must be a string", "model")
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise ShapeError(f"'model' is longer than {MAX_MODEL_NAME_CHARS} characters", "model")
    stream = _optional(body, "stream", bool, "a boolean")
    options = _optional(body, "stream_options", dict, "an object")
    if options is not None and not isinstance(options.get("include_usage", False), bool):
        raise ShapeError("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    n = _optional(body, "n", int, "an integer")
    if n is not None and not 1 <= n <= limits.max_n:
        raise ShapeError(f"'n' must be between 1 and {limits.max_n}", "n")
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):  # (the second wins, as in vLLM)
        value = _optional(body, key, int, "an integer")
        if value is not None and value < 0:
            raise ShapeError(f"'{key}' must be at least 0", key)
        max_tokens = value if value is not None else max_tokens
    user = _optional(body, "user", str, "a string")
    if user is not None and len(user) > MAX_USER_CHARS:
        raise ShapeError(f"'user' is longer than {MAX_USER_CHARS} characters", "user")
    opaque: list[str] = []
    if body.get("prompt_embeds") is not None:
        opaque.append("prompt_embeds")
    if endpoint == ENDPOINT_CHAT:
        prompts = 1
        _check_messages(body.get("messages"), limits, opaque)
        _check_tools(body.get("tools"))
    elif endpoint == ENDPOINT_COMPLETIONS:
        prompts = _check_prompt(body.get("prompt"), limits, opaque, has_embeds=bool(opaque))
    elif endpoint == ENDPOINT_EMBEDDINGS:
        prompts = _check_embedding(body, limits, opaque)
        if stream:
            raise ShapeError("embeddings cannot be streamed", "stream")
        max_tokens = 1  # one pooling step: what the scheduler predicts its slot time from
    else:
        raise ShapeError(f"unknown endpoint {endpoint!r}")
    temperature, seed = body.get("temperature"), body.get("seed")
    deterministic = (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0) \
        or (isinstance(seed, int) and not isinstance(seed, bool))
    return RequestShape(model, bool(stream), options, n or 1, prompts, max_tokens, user, tuple(opaque), deterministic)


def _check_messages(messages: Any, limits: ShapeLimits, opaque: list[str]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ShapeError("'messages' must be a non-empty array of message objects", "messages")
    if len(messages) > limits.max_messages:
        raise ShapeError(f"'messages' has more than {limits.max_messages} entries", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ShapeError(f"'{where}' must be an object", where)
        if not isinstance(message.get("role"), str):
            raise ShapeError(f"'{where}.role' is required and must be a string", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]", opaque)
        elif content is not None and not isinstance(content, str):
            raise ShapeError(f"'{where}.content' must be a string, an array of parts or null", f"{where}.content")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ShapeError(f"'{where}.{key}' must be a string", f"{where}.{key}")
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise ShapeError(f"'{where}.tool_calls' must be an array of tool calls", f"{where}.tool_calls")
        for j, call in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise ShapeError(f"'{at}.function' must be an object", f"{at}.function")
            if not isinstance(function.get("name"), str):
                raise ShapeError(f"'{at}.function.name' must be a string", f"{at}.function.name")
            if not isinstance(function.get("arguments", ""), str):
                raise ShapeError(f"'{at}.function.arguments' must be a string", f"{at}.function.arguments")


def _check_part(part: Any, where: str, opaque: list[str]) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ShapeError(f"'{where}' must be an object with a string 'type'", where)
    if part["type"] in TEXT_PART_TYPES:
        if not isinstance(part.get("text"), str):
            raise ShapeError(f"'{where}.text' must be a string", f"{where}.text")
    elif part["type"][:64] not in opaque:
        opaque.append(part["type"][:64])


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise ShapeError("'tools' must be an array", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function", {}), dict):
            raise ShapeError(f"'tools[{i}]' must be an object with a 'function' object", f"tools[{i}]")


def _check_prompt(prompt: Any, limits: ShapeLimits, opaque: list[str], has_embeds: bool) -> int:
    if prompt is None and has_embeds:
        return 1
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and prompt:
        count = _count_items(prompt, "prompt", opaque)
        if count > limits.max_prompts:
            raise ShapeError(f"'prompt' holds more than {limits.max_prompts} prompts", "prompt")
        return count
    raise ShapeError("'prompt' is required: a string, an array of strings, of token ids, or of token-id arrays",
                     "prompt")


def _count_items(items: list, name: str, opaque: list[str]) -> int:
    """Prompts in a non-empty array of OpenAI's forms: strings, token ids (one prompt), or arrays of
    token ids (token ids are opaque to the PII scan)."""
    kinds = set(map(type, items))
    if kinds == {str}:
        return len(items)
    if kinds == {int}:
        opaque.append("token_ids")
        return 1
    if kinds == {list} and all(p and set(map(type, p)) == {int} for p in items):
        opaque.append("token_ids")
        return len(items)
    raise ShapeError(f"'{name}' must be a string, an array of strings, of token ids, or of token-id arrays", name)


def _check_embedding(body: dict, limits: ShapeLimits, opaque: list[str]) -> int:
    """``input``: a string, an array of strings, of token ids, or of token-id arrays (OpenAI's
    forms), none of them empty; returns the number of inputs."""
    value = body.get("input")
    if isinstance(value, str):
        if not value:
            raise ShapeError("'input' must not be an empty string", "input")
        count = 1
    elif isinstance(value, list) and value:
        if not all(value):
            raise ShapeError("'input' must not hold empty strings or arrays", "input")
        count = _count_items(value, "input", opaque)
    elif isinstance(value, list):
        raise ShapeError("'input' must not be an empty array", "input")
    else:
        raise ShapeError("'input' is required: a string, an array of strings, of token ids, or of token-id arrays",
                         "input")
    if count > limits.max_embedding_inputs:
        raise ShapeError(f"'input' holds {count} inputs; at most {limits.max_embedding_inputs} per request", "input")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in EMBEDDING_FORMATS:
        raise ShapeError(f"'encoding_format' must be one of {', '.join(EMBEDDING_FORMATS)}", "encoding_format")
    dimensions = _optional(body, "dimensions", int, "an integer")
    if dimensions is not None and dimensions < 1:
        raise ShapeError("'dimensions' must be at least 1", "dimensions")
    return count


def embedding_inputs(body: dict) -> int:
    """Inputs of an already validated embeddings body (never raises)."""
    value = body.get("input")
    return len(value) if isinstance(value, list) and value and not isinstance(value[0], int) else 1


def sequences_of(endpoint: str, body: dict, max_num_seqs: int | None = None) -> int:
    """Sequences an already validated body occupies (the engine's own count; never raises).
    Embeddings: one per input, at most ``max_num_seqs``."""
    if endpoint == ENDPOINT_EMBEDDINGS:
        inputs = embedding_inputs(body)
        return min(inputs, max_num_seqs) if max_num_seqs else inputs
    n = body.get("n")
    n = n if _is_int(n) and n > 0 else 1
    prompt = body.get("prompt") if endpoint == ENDPOINT_COMPLETIONS else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)
    return n
