"""The engine's vLLM arguments: the typed engine config translated into ``vllm serve``'s own
command line and parsed by vLLM's own server parser, so an engine starts as ``vllm serve`` would
with the same flags. Unknown ``extra_args`` fail when the app is built, never on a request."""

from __future__ import annotations

import argparse

from serve_app.config import ModelConfig, TracingConfig


def vllm_cli_args(model: ModelConfig, model_path: str, tracing: TracingConfig | None = None) -> list[str]:
    """Translate the typed engine config into ``vllm serve`` command-line arguments."""
    engine = model.engine
    args = [
        "--model", model_path,
        "--served-model-name", model.id,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--dtype", engine.dtype,
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--pipeline-parallel-size", str(engine.pipeline_parallel_size),
        "--data-parallel-size", str(engine.data_parallel_size),
        "--seed", str(engine.seed),
        "--runner", engine.runner,
    ]
    if engine.workers_per_replica > 1 and model.resources.num_gpus > 0:
        # The workers run as Ray actors in the replica's placement group (one bundle each, every
        # bundle pinned to the replica's site), not as local processes.
        args += ["--distributed-executor-backend", "ray"]
    if engine.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if engine.quantization:
        args += ["--quantization", engine.quantization]
    if engine.enforce_eager:
        args.append("--enforce-eager")
    if engine.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    if engine.tool_parser and engine.runner == "generate":
        args += ["--enable-auto-tool-choice", "--tool-call-parser", engine.tool_parser]
    if engine.chat_template:
        args += ["--chat-template", engine.chat_template]
    if tracing is not None and tracing.engine_otlp_endpoint:
        # vLLM's request spans join the router's trace through the traceparent it is handed.
        args += ["--otlp-traces-endpoint", tracing.engine_otlp_endpoint]
    return args


def build_vllm_args(model: ModelConfig, model_path: str, tracing: TracingConfig | None = None) -> argparse.Namespace:
    """Parse our arguments with vLLM's own server parser, then apply ``extra_args``.

    Unknown ``extra_args`` keys fail here, when the replica starts (and in
    ``validate_engine_args`` when the app is built), never on a request.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="spillway-engine"))
    namespace = parser.parse_args(vllm_cli_args(model, model_path, tracing))
    known = vars(namespace)
    for key, value in model.engine.extra_args.items():
        attr = key.replace("-", "_")
        if attr not in known:
            raise ValueError(f"model {model.id!r}: engine.extra_args has unknown vLLM argument {key!r}")
        setattr(namespace, attr, value)
    return namespace


def validate_engine_args(model: ModelConfig) -> None:
    """Check ``extra_args`` against vLLM's parser without starting anything."""
    build_vllm_args(model, "placeholder-model")
