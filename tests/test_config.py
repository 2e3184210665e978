"""Config validation: strict keys, cross-field checks, one loader for YAML paths, strings and dicts."""

import copy

import pytest
import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, SiteKind, load_config
from serve_app.errors import ConfigError


@pytest.fixture
def raw():
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_default_config_loads_two_sites_dense_and_moe():
    config = load_config(DEFAULT_CONFIG_PATH)
    assert [s.name for s in config.sites] == ["onprem", "cloud"]
    assert config.site("onprem").kind is SiteKind.onprem
    assert config.model("spillway-dense").replicas == {"onprem": 1, "cloud": 1}
    assert config.model("spillway-moe").replicas == {"onprem": 1}
    assert config.router_site.name == "onprem"
    assert [n.site for n in config.local_cluster.nodes] == ["onprem", "cloud"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(unknown_top=1), "unknown_top"),
        (lambda c: c["models"][0].update(replica={"onprem": 1}), "replica"),
        (lambda c: c["models"][0]["engine"].update(max_num_seq=3), "max_num_seq"),
        (lambda c: c["router"].update(max_body_byte=3), "max_body_byte"),
        (lambda c: c["sites"][0].update(kind="basement"), "kind"),
        (lambda c: c["models"][0].update(replicas={"mars": 1}), "unknown site"),
        (lambda c: c["models"][0].update(replicas={"onprem": 0}), "no replica"),
        (lambda c: c["models"][0].update(replicas={"onprem": -1}), ">= 0"),
        (lambda c: c["models"].append(copy.deepcopy(c["models"][0])), "unique"),
        (lambda c: c["sites"].append(copy.deepcopy(c["sites"][0])), "unique"),
        (lambda c: c["sites"][0].update(name="On Prem"), "slug"),
        (lambda c: c["router"].update(site="mars"), "router.site"),
        (lambda c: c["local_cluster"]["nodes"].append({"site": "mars", "num_cpus": 1}), "mars"),
        (lambda c: c["models"][0]["engine"].update(max_model_len=0), "greater than 0"),
        (lambda c: c["http"].update(port=70000), "less than 65536"),
        (lambda c: c["router"].update(splits={"spillway-dense": {"variants": {"spillway-moe": 1}}}), "also a model id"),
        (lambda c: c["router"].update(splits={"chat": {"variants": {"gpt-9": 1}}}), "unknown model"),
        (lambda c: c["router"].update(splits={"chat": {"variants": {"spillway-moe": 0}}}), "sum to more than 0"),
        (lambda c: c["router"].update(filters=["residency", "geo"]), "Unknown filter policy 'geo'"),
        (lambda c: c["router"].update(scorers={"astrology": 1.0}), "Unknown scorer policy"),
        (lambda c: c["router"].update(pii_detectors=["ssn"]), "Unknown pii_detector policy"),
        (lambda c: c["sites"][1].update(trusted_up_to="secret"), "trusted_up_to"),
        (lambda c: c["local_cluster"].update(metrics_export_port=18180), "worker port range"),
        (lambda c: c["http"].update(port=18000), "worker port range"),
    ],
)
def test_invalid_configs_fail_at_load_with_the_offending_key(raw, mutate, message):
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert message in str(info.value)


def test_yaml_path_and_string_load_the_same(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path) == load_config(yaml.safe_dump(raw)) == load_config(raw)


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="mapping"):
        load_config("- a\n- b\n")


def test_router_site_defaults_to_preferred_onprem(raw):
    raw["sites"] = [
        {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 0},
        {"name": "dc2", "resource": "site:dc2", "kind": "onprem", "preference": 5},
        {"name": "dc1", "resource": "site:dc1", "kind": "onprem", "preference": 1},
    ]
    for model in raw["models"]:
        model["replicas"] = {"dc1": 1}
    raw["local_cluster"]["nodes"] = [{"site": "dc1", "num_cpus": 4}]
    assert load_config(raw).router_site.name == "dc1"


def test_engine_extra_args_are_checked_against_vllm(raw):
    from deployments.vllm_args import build_vllm_args, validate_engine_args

    raw["models"][0]["engine"]["extra_args"] = {"enable_prefix_caching": False, "block-size": 32}
    model = load_config(raw).models[0]
    args = build_vllm_args(model, "/models/x")
    assert args.enable_prefix_caching is False and args.block_size == 32
    assert args.served_model_name == ["spillway-dense"] and args.max_num_seqs == 32
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"

    raw["models"][0]["engine"]["extra_args"] = {"not_a_vllm_arg": 1}
    with pytest.raises(ValueError, match="not_a_vllm_arg"):
        validate_engine_args(load_config(raw).models[0])


def test_engine_knobs_pass_through_to_vllm(raw):
    from deployments.vllm_args import build_vllm_args

    raw["models"][0]["engine"].update(
        tensor_parallel_size=2, pipeline_parallel_size=2, enable_expert_parallel=True,
        quantization="fp8", tool_parser=None, max_model_len=4096,
    )
    args = build_vllm_args(load_config(raw).models[0], "org/model")
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 2)
    assert args.enable_expert_parallel and args.quantization == "fp8"
    assert args.max_model_len == 4096 and args.model == "org/model"
    assert not args.enable_auto_tool_choice


def test_ingress_modes_set_serve_flags_for_every_node():
    from serve_app.config import HttpConfig

    assert HttpConfig(ingress="proxy").ingress_env(2) == {}
    assert HttpConfig(ingress="proxy").proxy_port(2) == 8000
    # The default: the routers share the clients' port themselves; no Serve flag on any node, and
    # Serve's own proxy steps aside.
    assert HttpConfig().ingress == "shared" and HttpConfig(port=8000).ingress_env(2) == {}
    assert HttpConfig(port=8000).proxy_port(2) == 8150
    assert HttpConfig(port=8000, fallback_proxy_port=9000).extra_ports(2) == {"http.fallback_proxy_port": 9000}
    haproxy = HttpConfig(port=8000, ingress="haproxy").ingress_env(2)
    assert haproxy["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and haproxy["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert haproxy["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8100"  # routers behind HAProxy, which takes 8000
    assert int(haproxy["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) >= 8100 + 2
    assert {haproxy[k] for k in ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                                 "RAY_SERVE_HAPROXY_STATS_PORT")} == {"8150", "8151", "8152"}
    # Clients that send nothing are let go after 30 s, not Serve's hour; names Serve itself reads.
    from ray.serve._private import constants

    assert (haproxy["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"], haproxy["RAY_SERVE_HAPROXY_MAXCONN"]) == ("30", "4096")
    assert all(hasattr(constants, name) for name in haproxy if name.startswith("RAY_SERVE_HAPROXY_"))
    tight = HttpConfig(client_timeout_s=5, max_connections=20_000, ingress="haproxy").ingress_env(2)
    assert (tight["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"], tight["RAY_SERVE_HAPROXY_MAXCONN"]) == ("5", "20000")
    assert HttpConfig(port=8000, ingress="haproxy").proxy_port(2) == 8000  # HAProxy binds the clients' port
    direct = HttpConfig(port=8802, ingress="direct").ingress_env(2)
    assert direct["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8802" and "RAY_SERVE_ENABLE_HA_PROXY" not in direct
    # Serve's proxy (still started on the head) stays out of the routers' port range.
    assert HttpConfig(port=8802, ingress="direct").proxy_port(2) > int(direct["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["http"].update(fallback_proxy_port=c["http"]["port"]), "ports must differ"),
    (lambda c: c["http"].update(ingress="haproxy", router_port_base=8000), "ports must differ"),
    (lambda c: c["http"].update(port=10500), "worker port range"),
    (lambda c: c.update(engine_port={"max_frame_bytes": 1000}), "max_frame_bytes"),
    (lambda c: c["router"].update(policy_params={"affinity": {"max_keys": -1}}), "affinity"),
    (lambda c: c["router"].update(policy_params={"nonexistent": {}}), "not configured"),
    (lambda c: c["router"].update(spill_predictor="crystal_ball"), "crystal_ball"),
    (lambda c: c["router"].update(opaque_data_class="secret"), "opaque_data_class"),
])
def test_ingress_ports_engine_port_and_policy_parameters_are_checked_at_load(raw, mutate, message):
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        load_config(raw)
