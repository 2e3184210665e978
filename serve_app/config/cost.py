"""The cost model's configuration: what an hour (or a token) costs on each site, and how fast a
model turns an hour into tokens. The arithmetic is in ``serve_app/governance/cost.py``.

A site states one basis:
- ``amortised`` (own hardware): purchase price over its lifetime, power x PUE, operations;
- ``cloud``: a price per accelerator-hour, on-demand or spot;
- ``api``: a price per million input and output tokens (an external API);
- ``per_1k_tokens``: one flat price per 1,000 tokens (the simple form; ``cost_per_1k_tokens`` on the
  site is shorthand for it).
Hourly bases need the model's throughput per replica (``models[].throughput``) to become a price per
token.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from serve_app.config.base import Strict

HOURS_PER_YEAR = 8766.0  # 365.25 days


class AmortisedCost(Strict):
    """Own hardware: every hour is paid whether it serves tokens or not."""

    basis: Literal["amortised"]
    accelerator_price: float = Field(
        gt=0, description="Purchase price per accelerator (GPU), with its share of server, network and storage.")
    lifetime_years: float = Field(default=4.0, gt=0, description="Years over which the hardware is written off.")
    power_kw: float = Field(ge=0, description="Power per accelerator under load, with its share of the host (kW).")
    pue: float = Field(default=1.5, ge=1, description="Power usage effectiveness of the data centre (>= 1).")
    power_price_per_kwh: float = Field(ge=0, description="Price of one kWh of electricity.")
    operations_per_hour: float = Field(
        default=0.0, ge=0, description="Operations per accelerator-hour: staff, space, support contracts.")
    utilisation: float = Field(
        default=0.6, gt=0, le=1,
        description="Planning utilisation: the share of paid hours that serve at full batch. A request's cost "
        "is its share of a replica's time divided by this, so the requests pay for the idle hours too.")

    def per_accelerator_hour(self) -> float:
        return (self.accelerator_price / (self.lifetime_years * HOURS_PER_YEAR)
                + self.power_kw * self.pue * self.power_price_per_kwh + self.operations_per_hour)


class CloudCost(Strict):
    """Rented accelerators: paid per hour while the node exists (the autoscaler removes idle ones)."""

    basis: Literal["cloud"]
    on_demand_per_hour: float = Field(gt=0, description="On-demand price per accelerator-hour.")
    spot_per_hour: float | None = Field(default=None, gt=0, description="Spot price per accelerator-hour.")
    pricing: Literal["on_demand", "spot"] = Field(default="on_demand", description="Which of the two prices applies.")
    utilisation: float = Field(
        default=0.8, gt=0, le=1,
        description="Planning utilisation of a running cloud replica (scale-down delay and partial batches).")

    @model_validator(mode="after")
    def _spot_priced(self) -> "CloudCost":
        if self.pricing == "spot" and self.spot_per_hour is None:
            raise ValueError("pricing is spot but spot_per_hour is not set")
        return self

    def per_accelerator_hour(self) -> float:
        return self.spot_per_hour if self.pricing == "spot" else self.on_demand_per_hour


class ApiCost(Strict):
    """An external API: a price per token, nothing per hour."""

    basis: Literal["api"]
    input_per_million: float = Field(ge=0, description="Price of one million input (prompt) tokens.")
    output_per_million: float = Field(ge=0, description="Price of one million output (completion) tokens.")


class FlatCost(Strict):
    """The simple form: one price per 1,000 tokens, input and output alike."""

    basis: Literal["per_1k_tokens"]
    per_1k_tokens: float = Field(ge=0, description="Price of 1,000 tokens (input or output).")


SiteCost = Annotated[Union[AmortisedCost, CloudCost, ApiCost, FlatCost], Field(discriminator="basis")]
HOURLY_BASES = ("amortised", "cloud")


class ThroughputConfig(Strict):
    """How fast one replica turns its hours into tokens at full batch (measure it: the peer benchmark
    prints output tokens/s at concurrency = max_num_seqs)."""

    output_tokens_per_s: float = Field(gt=0, description="Output tokens per second of one replica at full batch.")
    input_tokens_per_s: float | None = Field(
        default=None, gt=0,
        description="Prompt tokens per second of one replica (prefill). Default: 10x the output rate.")
    accelerators_per_replica: float | None = Field(
        default=None, gt=0,
        description="Accelerators one replica holds. Default: resources.num_gpus x tensor x pipeline "
        "parallel size, or 1 where that is 0 (a CPU replica counts as one unit).")

    @property
    def input_rate(self) -> float:
        return self.input_tokens_per_s if self.input_tokens_per_s is not None else 10 * self.output_tokens_per_s
