"""Every YAML in cluster_configs/ checked with its owner's own validation, and a deliberately wrong
copy of each refused:
- `ray up` configs: Ray's ``prepare_config`` then ``validate_config`` (Ray 2.60.0, as pinned);
- `serve deploy` configs: Serve's ``ServeDeploySchema``, then the app built from its args;
- Spillway configs: ``load_config`` (strict), then the app built without starting it: placement
  groups per replica, every bundle pinned to its site.
Plus the links between them: node types carry their site, start commands carry the ingress
settings, set-up installs Spillway, serve configs point at configs that exist."""

import copy
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from serve_app.app import PROJECT_ROOT, SITE_RESOURCE_PER_BUNDLE, app_builder, build_app, deployment_name
from serve_app.config import load_config
from serve_app.errors import ConfigError

CONFIGS = PROJECT_ROOT / "cluster_configs"
RAY_CONFIGS = sorted((CONFIGS / "ray").glob("*.yaml"))
SERVE_CONFIGS = sorted((CONFIGS / "serve").glob("*.yaml"))
SPILLWAY_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def ray_validate(raw: dict) -> dict:
    """Ray's own checks, as `ray up` runs them. The fake multi-node provider's defaults file
    (example.yaml) is missing from the PyPI wheel: our complete config stands in for it (and its
    monitor validates the file as is, which the second call does)."""
    from ray.autoscaler._private import providers
    from ray.autoscaler._private.util import prepare_config, validate_config

    if raw.get("provider", {}).get("type") == "fake_multinode":
        validate_config(copy.deepcopy(raw))
        saved = providers._DEFAULT_CONFIGS["fake_multinode"]
        providers._DEFAULT_CONFIGS["fake_multinode"] = lambda: str(CONFIGS / "ray" / "fake-multinode.yaml")
        try:
            prepared = prepare_config(copy.deepcopy(raw))
        finally:
            providers._DEFAULT_CONFIGS["fake_multinode"] = saved
    else:
        prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def test_every_config_folder_has_files():
    assert {p.name for p in RAY_CONFIGS} >= {"aws-hybrid.yaml", "onprem-local.yaml", "fake-multinode.yaml"}
    assert {p.name for p in SERVE_CONFIGS} >= {"local.yaml", "hybrid-gpu.yaml", "fake-cloud.yaml"}


# ---- ray up -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_passes_rays_validation(path):
    prepared = ray_validate(yaml.safe_load(path.read_text()))
    assert prepared["cluster_name"]


def _break(raw: dict) -> tuple[dict, str]:
    """A realistic mistake per provider, and what Ray's checks say about it."""
    kind = raw["provider"]["type"]
    if kind == "local":
        raw["provider"].pop("head_ip")                   # the local provider needs the head's address
        return raw, "head_ip"
    if kind == "aws":
        raw["available_node_types"]["cloud-l4-spot"]["min_workers"] = "zero"   # not an integer
        return raw, "'zero' is not of type 'integer'"
    raw["available_node_types"]["cloud-cpu"]["resource"] = {"CPU": 1}      # misspelt key
    return raw, "'resource' was unexpected"


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_a_wrong_copy_of_each_ray_up_config_is_refused(path):
    raw, expected = _break(yaml.safe_load(path.read_text()))
    with pytest.raises(Exception) as info:
        ray_validate(raw)
    assert expected in str(info.value)


def test_aws_cluster_starts_cloud_at_zero_with_site_and_gpus_and_installs_spillway():
    raw = yaml.safe_load((CONFIGS / "ray" / "aws-hybrid.yaml").read_text())
    head = raw["available_node_types"][raw["head_node_type"]]
    assert not any(k.startswith("site:") for k in head["resources"])  # the head is no site: it runs no engine
    workers = {name: t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]}
    assert any("InstanceMarketOptions" in t["node_config"] for t in workers.values())       # spot
    assert any("InstanceMarketOptions" not in t["node_config"] for t in workers.values())   # on-demand
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["resources"]["site:cloud"] > 0 and node_type["resources"]["GPU"] > 0, name
    commands = " ".join(raw["setup_commands"])
    assert "pip install" in commands and "spillway[gpu]" in commands
    assert raw["file_mounts"] == {"~/spillway": "."}


def test_local_provider_puts_the_site_into_every_start_command():
    raw = yaml.safe_load((CONFIGS / "ray" / "onprem-local.yaml").read_text())
    assert "available_node_types" not in raw  # the local provider forbids them
    for command in [raw["head_start_ray_commands"][-1], raw["worker_start_ray_commands"][-1]]:
        resources = next(arg for arg in shlex.split(command) if arg.startswith("--resources="))
        assert json.loads(resources.split("=", 1)[1]) == {"site:onprem": 1000}
    assert any("pip install" in c and "spillway" in c for c in raw["setup_commands"])


def test_fake_multinode_head_is_onprem_and_cloud_nodes_start_from_zero():
    raw = yaml.safe_load((CONFIGS / "ray" / "fake-multinode.yaml").read_text())
    assert raw["head_node_type"] == "ray.head.default"  # the provider's fixed name for its head
    assert raw["available_node_types"]["ray.head.default"]["resources"]["site:onprem"] > 0
    cloud = raw["available_node_types"]["cloud-cpu"]
    assert cloud["min_workers"] == 0 and cloud["resources"]["site:cloud"] > 0


def test_onprem_join_script_joins_the_head_as_onprem_with_the_ingress_settings(tmp_path):
    """Run with a stand-in `ray` (it records its arguments and environment) and this machine's
    `spillway`: what the script would start, on a node without GPUs."""
    import os
    import sys

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "ray-calls"
    (fake_bin / "ray").write_text(f"""#!/usr/bin/env bash
[ "$1" = start ] || exit 0
printf '%s\n' "$@" > {record}
echo "ENV RAY_SERVE_ENABLE_DIRECT_INGRESS=${{RAY_SERVE_ENABLE_DIRECT_INGRESS:-}}" >> {record}
""")
    (fake_bin / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    subprocess.run(["bash", str(CONFIGS / "onprem" / "join.sh"), "10.1.2.3"], check=True, env=env, timeout=60)
    args = record.read_text().splitlines()  # `ray start` arguments, one per line, then the env
    assert "--address=10.1.2.3:6379" in args and "--num-gpus=0" in args
    resources = json.loads(next(a for a in args if a.startswith("--resources=")).split("=", 1)[1])
    assert resources == {"site:onprem": 1000}
    assert "ENV RAY_SERVE_ENABLE_DIRECT_INGRESS=" in args  # hybrid-gpu.yaml's shared ingress needs no Serve flag
    # A config on Serve's direct ingress: the node gets Serve's flags.
    raw = yaml.safe_load((CONFIGS / "hybrid-gpu.yaml").read_text())
    raw["http"]["ingress"] = "direct"
    direct = tmp_path / "direct.yaml"
    direct.write_text(yaml.safe_dump(raw))
    subprocess.run(["bash", str(CONFIGS / "onprem" / "join.sh"), "10.1.2.3"], check=True,
                   env={**env, "SPILLWAY_CONFIG": str(direct)}, timeout=60)
    assert "ENV RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in record.read_text().splitlines()


def test_start_commands_carry_the_ingress_settings_of_the_config_they_serve():
    """Serve reads its ingress settings on every node: the AWS start commands and the join script
    take them from the Spillway config the cluster serves (`spillway ingress-env`)."""
    raw = yaml.safe_load((CONFIGS / "ray" / "aws-hybrid.yaml").read_text())
    for command in [raw["head_start_ray_commands"][-1], raw["worker_start_ray_commands"][-1]]:
        assert "spillway ingress-env --config ~/spillway/cluster_configs/hybrid-gpu.yaml" in command
    from serve_app.ops.cli import main

    assert main(["ingress-env", "--config", str(CONFIGS / "hybrid-gpu.yaml")]) == 0


# ---- serve deploy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_deploy_config_passes_serves_schema_and_builds(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "serve_app.app:app_builder"
    config = load_config(PROJECT_ROOT / app_cfg.args["config"])
    assert app_cfg.name == config.name
    # Serve's proxy port is the one Spillway's ingress leaves it (HAProxy or the routers hold the rest).
    assert schema.http_options.port == config.http.proxy_port(config.router.replicas)
    assert schema.proxy_location == "HeadOnly"
    app = app_builder(app_cfg.args)
    assert sorted(app._bound_deployment.init_args[1]) == sorted(m.id for m in config.models)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_a_wrong_copy_of_each_serve_config_is_refused(path):
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(path.read_text())
    raw["applications"][0]["import_paht"] = raw["applications"][0].pop("import_path")
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(raw)


# ---- Spillway configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SPILLWAY_CONFIGS, ids=lambda p: p.name)
def test_spillway_config_loads_and_builds_with_every_bundle_on_its_site(path):
    config = load_config(path)
    app = build_app(config)
    engines = app._bound_deployment.init_args[1]
    for model in config.models:
        for site_name in model.replicas:
            if not model.deploys_on(site_name):
                continue
            deployment = engines[model.id][site_name]._bound_deployment
            assert deployment.name == deployment_name(model.id, site_name)
            resource = config.site(site_name).resource
            bundles = deployment._replica_config.placement_group_bundles
            assert bundles and all(b.get(resource) == SITE_RESOURCE_PER_BUNDLE for b in bundles)
            assert all(not k.startswith("site:") or k == resource for b in bundles for k in b)


@pytest.mark.parametrize("path", SPILLWAY_CONFIGS, ids=lambda p: p.name)
def test_a_wrong_copy_of_each_spillway_config_is_refused(path):
    raw = yaml.safe_load(path.read_text())
    raw["models"][0]["replicas"]["nowhere"] = 1  # a site that does not exist
    with pytest.raises(ConfigError, match="unknown site"):
        load_config(raw)


def test_gpu_fleet_places_tensor_expert_and_pipeline_parallel_replicas_on_their_site():
    config = load_config(CONFIGS / "hybrid-gpu.yaml")
    engines = build_app(config)._bound_deployment.init_args[1]

    def replica(model: str, site: str):
        return engines[model][site]._bound_deployment._replica_config

    mixtral = replica("mixtral-8x7b", "onprem")
    # One bundle for the replica actor, one GPU bundle per tensor-parallel worker, on one node.
    assert [b.get("GPU", 0) for b in mixtral.placement_group_bundles] == [0, 1, 1]
    assert mixtral.placement_group_strategy == "STRICT_PACK"
    assert "cloud" not in engines["mixtral-8x7b"]  # confidential work: no cloud deployment at all
    big = replica("llama-3.1-70b", "onprem")
    assert len(big.placement_group_bundles) == 1 + 8
    assert big.placement_group_strategy == "PACK"  # pipeline stages may span on-prem nodes
    assert all(b["site:onprem"] == SITE_RESOURCE_PER_BUNDLE for b in big.placement_group_bundles)
    cloud_8b = engines["llama-3.1-8b"]["cloud"]._bound_deployment
    scaling = cloud_8b._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (0, 8, 0)
    assert scaling.policy.policy_function == "serve_app.ops.autoscale:follow_cloud_scaler"


def test_parallel_settings_reach_vllm():
    from deployments.vllm_args import build_vllm_args

    config = load_config(CONFIGS / "hybrid-gpu.yaml")
    mixtral = build_vllm_args(config.model("mixtral-8x7b"), "placeholder")
    assert (mixtral.tensor_parallel_size, mixtral.enable_expert_parallel) == (2, True)
    assert mixtral.distributed_executor_backend == "ray"  # workers in the replica's placement group
    big = build_vllm_args(config.model("llama-3.1-70b"), "placeholder")
    assert (big.tensor_parallel_size, big.pipeline_parallel_size) == (4, 2)
    raw = yaml.safe_load((CONFIGS / "hybrid-gpu.yaml").read_text())
    raw["models"][0]["engine"]["data_parallel_size"] = 2
    assert build_vllm_args(load_config(raw).model("mixtral-8x7b"), "placeholder").data_parallel_size == 2
