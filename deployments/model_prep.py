"""Generate the small models Spillway serves out of the box.

Nothing can be downloaded on the machines we develop and test on, so the
project writes its own models: a dense Llama-style model and a MoE
Mixtral-style model, with seeded random weights, a byte-level tokenizer and a
chat template that knows system, user, assistant, tool-call and tool messages
(Hermes-style ``<tool_call>`` blocks, so vLLM's ``hermes`` tool parser reads
them). The output is a normal Hugging Face folder: vLLM loads it from disk
exactly as it would load a model from a hub.

Generation is deterministic: the same spec and seed write byte-identical
weights, so tests and benchmarks on two machines talk to the same model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("SPILLWAY_MODEL_CACHE", Path.home() / ".cache" / "spillway" / "models"))

# Byte tokens take ids 0..255 (id == byte value); special tokens follow.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|im_end|>", "<|pad|>"
VOCAB_SIZE = 320  # 256 bytes + specials, padded to a multiple of 64

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "You can call these functions:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nTo call one, reply with <tool_call>{\"name\": <name>, \"arguments\": <object>}</tool_call>"
    "<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>tool\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "<|im_start|>assistant\n{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls %}"
    "<tool_call>{\"name\": {{ call.function.name | tojson }}, \"arguments\": {{ call.function.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content if message.content is string else '' }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one generated model. Small on purpose: it must run on 2 CPU cores."""

    name: str
    architecture: str  # "llama" or "mixtral"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    seed: int = 0


BUILTIN_MODELS: dict[str, ModelSpec] = {
    "dense": ModelSpec(name="dense", architecture="llama", seed=1234),
    "moe": ModelSpec(
        name="moe",
        architecture="mixtral",
        intermediate_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        seed=4321,
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_tokenizer():
    """A byte-level tokenizer: every byte is one token, so any text round-trips."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_config(spec: ModelSpec, tokenizer):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    if spec.architecture == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if spec.architecture == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            num_local_experts=spec.num_local_experts,
            num_experts_per_tok=spec.num_experts_per_tok,
            **common,
        )
    raise ValueError(f"Unknown architecture {spec.architecture!r}; expected 'llama' or 'mixtral'")


def _write_model(spec: ModelSpec, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer()
    config = _build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)


def spec_fingerprint(spec: ModelSpec) -> str:
    return hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:12]


def model_dir(name: str, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / name


def prepare_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Write the built-in model ``name`` under ``cache_dir`` unless an identical one is there.

    The folder is written to a temporary sibling and renamed into place, so a
    crash never leaves a half-written model that a later run would trust.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"Unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    spec = BUILTIN_MODELS[name]
    target = model_dir(name, cache_dir)
    stamp = target / "spillway-spec.json"
    fingerprint = spec_fingerprint(spec)

    def is_current() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint

    if not force and is_current():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several replicas on one node may prepare the same model at once: one writes, the rest wait.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_current():
            return target
        _write_atomically(spec, fingerprint, target)
    return target


def _write_atomically(spec: ModelSpec, fingerprint: str, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        _write_model(spec, tmp)
        (tmp / "spillway-spec.json").write_text(
            json.dumps({"fingerprint": fingerprint, "spec": spec.__dict__}, indent=2, sort_keys=True)
        )
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def weights_digest(path: Path) -> str:
    """SHA-256 over the weight files of a model folder (used to prove determinism)."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()
