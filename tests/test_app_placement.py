"""Site placement of engine deployments and the router, without a cluster."""

import pytest
import yaml

from serve_app.app import SITE_RESOURCE_PER_BUNDLE, build_app, deployment_name, placement_bundles
from serve_app.config import DEFAULT_CONFIG_PATH, load_config
from serve_app.router.placement import build_targets


@pytest.fixture
def raw():
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_every_bundle_carries_the_site_resource_cpu(raw):
    config = load_config(raw)
    bundles = placement_bundles(config.model("spillway-dense"), config.site("cloud"))
    assert bundles == [{"CPU": 1.0, "site:cloud": SITE_RESOURCE_PER_BUNDLE}]


def test_every_bundle_carries_the_site_resource_gpu_tensor_parallel(raw):
    raw["models"][1]["engine"].update(tensor_parallel_size=2, pipeline_parallel_size=2)
    raw["models"][1]["resources"] = {"num_cpus": 2, "num_gpus": 1, "memory_gib": 8}
    config = load_config(raw)
    bundles = placement_bundles(config.model("spillway-moe"), config.site("onprem"))
    assert len(bundles) == 1 + 4
    assert all(b["site:onprem"] == SITE_RESOURCE_PER_BUNDLE for b in bundles)
    assert all("site:cloud" not in b for b in bundles)
    assert bundles[0]["CPU"] == 2 and bundles[0]["memory"] == 8 * 1024**3
    assert all(b["GPU"] == 1 for b in bundles[1:])


def test_deployment_names_are_safe_for_hub_ids():
    assert deployment_name("meta-llama/Llama-3.1-8B", "onprem") == "engine-meta-llama_Llama-3.1-8B-onprem"


def test_app_has_one_engine_per_model_site_and_router_on_onprem(raw):
    app = build_app(load_config(raw))
    router = app._bound_deployment
    assert router.name == "router"
    assert router.ray_actor_options["resources"] == {"site:onprem": SITE_RESOURCE_PER_BUNDLE}
    engines = router.init_args[1]
    assert {m: sorted(s) for m, s in engines.items()} == {"spillway-dense": ["cloud", "onprem"], "spillway-moe": ["onprem"],
                                                          "all-minilm-l6-v2": ["onprem"]}
    cloud = engines["spillway-dense"]["cloud"]._bound_deployment
    assert cloud.name == "engine-spillway-dense-cloud"
    assert cloud.ray_actor_options["resources"] == {"site:cloud": SITE_RESOURCE_PER_BUNDLE}
    assert cloud.ray_actor_options["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert cloud._deployment_config.max_ongoing_requests == 32


def test_serves_access_line_per_request_is_off_on_the_router_unless_asked_for(raw):
    router = build_app(load_config(raw))._bound_deployment
    assert router._deployment_config.logging_config["enable_access_log"] is False
    raw.setdefault("router", {})["serve_access_log"] = True
    router = build_app(load_config(raw))._bound_deployment
    assert router._deployment_config.logging_config["enable_access_log"] is True


def test_site_engine_env_overrides_the_model_env(raw):
    raw["sites"][1]["engine_env"] = {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    app = build_app(load_config(raw))
    engines = app._bound_deployment.init_args[1]
    env = lambda site: engines["spillway-dense"][site]._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]  # noqa: E731
    assert env("cloud")["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env("onprem")["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env("cloud")["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_engine_groups_rank_onprem_first_with_site_trust_and_slots(raw):
    raw["models"][0]["replicas"] = {"cloud": 3, "onprem": 2}
    config = load_config(raw)
    targets = build_targets(config, {"spillway-dense": {"cloud": "h-cloud", "onprem": "h-onprem"}})
    groups = [t.group for t in targets["spillway-dense"].values()]
    assert [(g.site, g.site_rank, g.capacity, g.trusted_up_to.name) for g in groups] == [
        ("onprem", 0, 64, "restricted"),
        ("cloud", 1, 96, "internal"),
    ]
    assert targets["spillway-dense"]["spillway-dense@cloud"].handle == "h-cloud"


def test_serve_deploy_yaml_is_valid_and_builds_the_same_app():
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import PROJECT_ROOT, app_builder

    schema = ServeDeploySchema.model_validate(yaml.safe_load((PROJECT_ROOT / "cluster_configs/serve/local.yaml").read_text()))
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "serve_app.app:app_builder"
    app = app_builder(app_cfg.args)
    engines = app._bound_deployment.init_args[1]
    assert sorted(engines) == ["all-minilm-l6-v2", "spillway-dense", "spillway-moe"]


def test_local_cluster_pins_ray_auth_mode_unless_the_user_set_it(monkeypatch):
    """Ray enables token auth on `ray start` when ~/.ray/auth_token exists, but its clients only send
    the token with RAY_AUTH_MODE=token; the local cluster pins one mode for all its processes."""
    import os

    from serve_app.config import DEFAULT_CONFIG_PATH, load_config
    from serve_app.ops.local_cluster import LocalCluster

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    LocalCluster(load_config(DEFAULT_CONFIG_PATH))
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    LocalCluster(load_config(DEFAULT_CONFIG_PATH))
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_a_new_model_version_changes_only_that_models_engine_versions(raw):
    """Deployments carry a digest of what they run: Serve replaces only what changed."""
    def versions(raw_config):
        router = build_app(load_config(raw_config))._bound_deployment
        found = {"router": router.version, "ledger": router.init_args[2]._bound_deployment.version,
                 "operator": router.init_args[3]._bound_deployment.version}
        for by_site in router.init_args[1].values():
            for engine in by_site.values():
                found[engine._bound_deployment.name] = engine._bound_deployment.version
        return found

    before = versions(raw)
    assert versions(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())) == before  # deterministic
    raw["models"][0]["version"] = "v2"
    raw["models"][0]["engine"]["extra_args"] = {"max_num_batched_tokens": 4096}
    after = versions(raw)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"engine-spillway-dense-onprem", "engine-spillway-dense-cloud"}
    raw["models"][0]["engine"]["max_num_seqs"] = 8  # the routers' capacity changes: they restart too
    assert versions(raw)["router"] != before["router"]


def test_a_stopping_router_lets_its_streams_finish_as_long_as_the_engines_do(raw):
    """Serve's default (20 s) would cut a stream through a router replica being replaced."""
    router = build_app(load_config(raw))._bound_deployment
    assert router._deployment_config.graceful_shutdown_timeout_s == 60.0  # the models' default
    raw["models"][0]["graceful_shutdown_timeout_s"] = 300
    router = build_app(load_config(raw))._bound_deployment
    assert router._deployment_config.graceful_shutdown_timeout_s == 300
    raw.setdefault("router", {})["graceful_shutdown_timeout_s"] = 45
    router = build_app(load_config(raw))._bound_deployment
    assert router._deployment_config.graceful_shutdown_timeout_s == 45
