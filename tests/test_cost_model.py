"""The cost model's arithmetic against worked examples written out by hand (no Ray).

Prices used (list prices as published; illustrations of the arithmetic, not quotes):
- NVIDIA H100: about $30,000 per GPU with its share of the server (press reports of $25,000-40,000
  per H100, e.g. CNBC, 2024); H100 SXM board power 700 W (NVIDIA H100 datasheet), so 1.0 kW per GPU
  with its share of the host.
- PUE 1.56: the average reported by the Uptime Institute Global Data Center Survey 2024.
- Electricity $0.08 per kWh: US industrial average retail price (US EIA, Electric Power Monthly, 2024).
- AWS p5.48xlarge (8 x H100) on-demand in us-east-1: $98.32 per hour (AWS EC2 on-demand pricing page,
  2024), so $12.29 per GPU-hour.
- OpenAI gpt-4o-mini: $0.15 per million input tokens, $0.60 per million output tokens (OpenAI API
  pricing page, July 2024).
- 2,500 output tokens/s and 25,000 prompt tokens/s for one replica of an 8B model on one H100 at full
  batch: an assumption of the example (measure yours with benchmarks/peers.py).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from serve_app.config import load_config
from serve_app.errors import ConfigError
from serve_app.governance.cost import CostModel, cost_report
from serve_app.ops.cli import main as cli_main

ONPREM = {"basis": "amortised", "accelerator_price": 30_000, "lifetime_years": 4, "power_kw": 1.0, "pue": 1.56,
          "power_price_per_kwh": 0.08, "operations_per_hour": 0.30, "utilisation": 0.6}
CLOUD = {"basis": "cloud", "on_demand_per_hour": 98.32 / 8, "spot_per_hour": 4.00, "utilisation": 0.8}
API = {"basis": "api", "input_per_million": 0.15, "output_per_million": 0.60}
THROUGHPUT = {"output_tokens_per_s": 2_500, "input_tokens_per_s": 25_000}


def fleet(onprem=ONPREM, cloud=CLOUD, api=API, throughput=THROUGHPUT, **model_extra) -> dict:
    return copy.deepcopy({
        "sites": [
            {"name": "onprem", "resource": "site:onprem", "kind": "onprem", "cost": onprem},
            {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1, "cost": cloud},
            {"name": "api", "kind": "external", "preference": 2, "cost": api,
             "external": {"base_url": "https://api.example.com/v1"}},
        ],
        "models": [{"id": "llama-8b", "source": "org/llama-8b", "replicas": {"onprem": 1, "cloud": 0, "api": 0},
                    "throughput": throughput, **model_extra}],
    })


def test_amortised_hour_and_token_prices_match_the_worked_example():
    costs = CostModel(load_config(fleet()))
    # hardware: 30,000 / (4 years x 8,766 h) = 0.855578 per GPU-hour
    # power:    1.0 kW x 1.56 PUE x 0.08 per kWh = 0.1248
    # ops:      0.30
    hourly = 30_000 / (4 * 8_766) + 1.0 * 1.56 * 0.08 + 0.30
    assert hourly == pytest.approx(1.280378, rel=1e-6)
    assert costs.hourly("onprem") == pytest.approx(hourly)
    # one replica-second costs 1.280378 / 3600; at 60 % utilisation a served second carries 1/0.6 of it
    per_output = hourly / 3600 / 0.6 / 2_500
    assert per_output * 1e6 == pytest.approx(0.237107, rel=1e-5)  # per million output tokens
    price = costs.price("llama-8b", "onprem")
    assert price.per_million_output == pytest.approx(0.237107, rel=1e-5)
    assert price.per_million_input == pytest.approx(0.0237107, rel=1e-5)
    # a request of 1,000 prompt and 500 output tokens
    assert costs.request_cost("llama-8b", "onprem", (1_000, 500)) == pytest.approx(
        1_000 * 0.0237107e-6 + 500 * 0.237107e-6, rel=1e-5)


def test_utilisation_moves_the_owned_price_and_not_the_hourly_bill():
    costs = CostModel(load_config(fleet()))
    full = costs.price("llama-8b", "onprem", utilisation=1.0).per_output_token
    half = costs.price("llama-8b", "onprem", utilisation=0.5).per_output_token
    assert half == pytest.approx(2 * full)  # idle hours are paid by the tokens that are served
    with pytest.raises(ValueError):
        costs.price("llama-8b", "onprem", utilisation=0.0)


def test_cloud_on_demand_and_spot():
    costs = CostModel(load_config(fleet()))
    # 98.32 / 8 = 12.29 per GPU-hour; / 3600 / 0.8 utilisation / 2,500 tokens/s = 1.706944 per million
    assert costs.hourly("cloud") == pytest.approx(12.29)
    assert costs.price("llama-8b", "cloud").per_million_output == pytest.approx(1.706944, rel=1e-6)
    spot = CostModel(load_config(fleet(cloud={**CLOUD, "pricing": "spot"})))
    # 4.00 / 3600 / 0.8 / 2,500 = 0.555556 per million
    assert spot.price("llama-8b", "cloud").per_million_output == pytest.approx(0.555556, rel=1e-5)


def test_api_is_priced_per_token():
    costs = CostModel(load_config(fleet()))
    assert costs.hourly("api") is None
    # 1,000 x 0.15 / 1e6 + 500 x 0.60 / 1e6 = 0.00015 + 0.0003
    assert costs.request_cost("llama-8b", "api", (1_000, 500)) == pytest.approx(0.00045)


def test_break_even_utilisation_of_owned_hardware():
    costs = CostModel(load_config(fleet()))
    # on-prem at 100 %: 1.280378 / 3600 / 2,500 = 0.142264 per million output tokens
    # against cloud 1.706944: on-prem is cheaper above 0.142264 / 1.706944 = 8.33 % utilisation
    assert costs.break_even("llama-8b", "onprem", "cloud") == pytest.approx(0.083344, rel=1e-4)
    # against the API's 0.60 per million output tokens: above 23.7 %
    assert costs.break_even("llama-8b", "onprem", "api") == pytest.approx(0.237107, rel=1e-4)
    assert costs.break_even("llama-8b", "cloud", "onprem") is None  # only owned hardware has one


def test_accelerators_per_replica_multiply_the_hour():
    two = CostModel(load_config(fleet(throughput={**THROUGHPUT, "accelerators_per_replica": 2})))
    one = CostModel(load_config(fleet()))
    assert two.price("llama-8b", "cloud").per_output_token == pytest.approx(
        2 * one.price("llama-8b", "cloud").per_output_token)
    # by default, GPUs per worker x tensor parallel size
    tp = load_config(fleet(resources={"num_gpus": 1}, engine={"tensor_parallel_size": 4}))
    assert tp.model("llama-8b").accelerators_per_replica("cloud") == 4


def test_site_throughput_overrides_the_model_default():
    raw = fleet(site_throughput={"cloud": {"output_tokens_per_s": 5_000}})
    costs = CostModel(load_config(raw))
    assert costs.price("llama-8b", "cloud").per_million_output == pytest.approx(1.706944 / 2, rel=1e-6)
    # no input rate given: prefill is taken as 10x the output rate
    assert costs.price("llama-8b", "cloud").per_input_token == pytest.approx(
        costs.price("llama-8b", "cloud").per_output_token / 10)


def test_the_flat_form_keeps_its_old_arithmetic():
    raw = fleet()
    raw["sites"][0] = {"name": "onprem", "resource": "site:onprem", "kind": "onprem", "cost_per_1k_tokens": 0.02}
    costs = CostModel(load_config(raw))
    assert costs.request_cost("llama-8b", "onprem", (700, 300)) == pytest.approx(1_000 * 0.02 / 1000)
    assert costs.per_1k_output("llama-8b", "onprem") == pytest.approx(0.02)
    assert costs.request_cost("llama-8b", "onprem", None) == 0.0  # no usage reported: nothing counted


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw["models"][0].pop("throughput"), "give models[].throughput"),
    (lambda raw: raw["sites"][0].update(cost_per_1k_tokens=0.02), "either cost_per_1k_tokens or cost"),
    (lambda raw: raw["sites"][1]["cost"].update(pricing="spot", spot_per_hour=None), "spot_per_hour"),
    (lambda raw: raw["sites"][0]["cost"].update(pue=0.9), "pue"),
    (lambda raw: raw["sites"][0]["cost"].update(utilisation=1.5), "utilisation"),
    (lambda raw: raw["sites"][0]["cost"].update(basis="leased"), "basis"),
    (lambda raw: raw["models"][0].update(site_throughput={"mars": THROUGHPUT}), "unknown site"),
])
def test_cost_config_mistakes_fail_at_load(mutate, message):
    raw = fleet()
    mutate(raw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(raw)


def test_report_and_cli(tmp_path, capsys):
    import yaml

    report = cost_report(load_config(fleet()), utilisation=0.5)
    onprem = next(m for m in report["models"] if m["site"] == "onprem")
    assert onprem["utilisation"] == 0.5
    assert onprem["per_million_output"] == pytest.approx(0.142264 / 0.5, rel=1e-4)
    cloud = next(m for m in report["models"] if m["site"] == "cloud")
    assert cloud["utilisation"] == 0.8  # the what-if applies to owned sites only
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet()))
    assert cli_main(["cost", "--config", str(path), "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "llama-8b: onprem is cheaper than cloud above 8.3% utilisation" in out
    assert "llama-8b: onprem is cheaper than api above 23.7% utilisation" in out
    assert cli_main(["cost", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"][1]["per_accelerator_hour"] == pytest.approx(12.29)
    assert cli_main(["cost", "--config", str(path), "--utilisation", "2"]) == 2


def test_a_site_priced_far_above_another_never_breaks_even():
    costly = {**ONPREM, "accelerator_price": 3_000_000}
    costs = CostModel(load_config(fleet(onprem=costly)))
    assert costs.break_even("llama-8b", "onprem", "api") > 1
