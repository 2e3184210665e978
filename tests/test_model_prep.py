"""Generated models: deterministic, loadable Hugging Face folders with a byte tokenizer and tool-aware template."""

import json

import pytest

from deployments.model_prep import BUILTIN_MODELS, build_tokenizer, prepare_model, weights_digest
from deployments.sources import resolve_model_source


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: prepare_model(name, root) for name in ("dense", "moe")}


def test_generation_is_deterministic(prepared, tmp_path):
    for name, path in prepared.items():
        again = prepare_model(name, tmp_path / "again", force=True)
        assert weights_digest(again) == weights_digest(path)
    assert weights_digest(prepared["dense"]) != weights_digest(prepared["moe"])


def test_prepare_is_idempotent(prepared):
    path = prepared["dense"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert prepare_model("dense", path.parent) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_dense_is_llama_and_moe_is_mixtral_top2_of_4(prepared):
    dense = json.loads((prepared["dense"] / "config.json").read_text())
    moe = json.loads((prepared["moe"] / "config.json").read_text())
    assert dense["architectures"] == ["LlamaForCausalLM"]
    assert moe["architectures"] == ["MixtralForCausalLM"]
    assert moe["num_local_experts"] >= 4 and moe["num_experts_per_tok"] == 2
    for cfg in (dense, moe):
        assert (prepared["dense"] / "tokenizer.json").exists()
        assert cfg["eos_token_id"] == build_tokenizer().convert_tokens_to_ids("<|im_end|>")


def test_byte_tokenizer_round_trips_any_text():
    tok = build_tokenizer()
    text = "Grüße, 東京! \t\n emoji 🚀 <tool_call>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < 256 for i in tok.encode("plain ascii"))  # one token per byte
    assert len(tok.encode("é")) == 2


def test_chat_template_renders_tools_tool_calls_and_tool_results():
    tok = build_tokenizer()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in text and "<tools>" in text and "be brief" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert plain == "<|begin_of_text|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_sources_resolve_builtin_paths_and_hub_ids(prepared, tmp_path):
    assert resolve_model_source("builtin:dense", prepared["dense"].parent) == str(prepared["dense"])
    assert resolve_model_source(str(prepared["moe"])) == str(prepared["moe"].resolve())
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(KeyError, match="Unknown built-in"):
        resolve_model_source("builtin:giant", tmp_path)
    assert set(BUILTIN_MODELS) == {"dense", "moe"}
