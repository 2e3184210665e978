"""The cost model: what a request costs from where it ran and what it used.

An hour becomes a price per token through the replica's **measured throughput**, not through a
request's GPU-seconds. Under continuous batching a step serves up to ``max_num_seqs`` sequences at
once, so a request's own GPU time is not observable; its share of the replica is. A request that
produced ``out`` tokens and read ``inp`` prompt tokens used

    replica_seconds = out / output_tokens_per_s + inp / input_tokens_per_s

of a replica running at full batch. The replica costs ``hourly x accelerators / 3600`` per second,
and only a share ``utilisation`` of the paid seconds serve at full batch, so

    cost = replica_seconds x hourly x accelerators / 3600 / utilisation.

Summed over a period, the requests pay exactly the site's bill when the real utilisation equals the
planning one (above it they overpay, below it they underpay; ``spillway cost`` shows how the price
moves with utilisation). An external API's price is already per token. The flat form is a price
per 1,000 tokens, input and output alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.config import SpillwayConfig
from serve_app.config.cost import HOURLY_BASES, AmortisedCost, ApiCost, FlatCost

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Price:
    """The price of one token of a model on a site."""

    per_input_token: float
    per_output_token: float

    def of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.per_input_token + completion_tokens * self.per_output_token

    @property
    def per_million_output(self) -> float:
        return self.per_output_token * 1e6

    @property
    def per_million_input(self) -> float:
        return self.per_input_token * 1e6


FREE = Price(0.0, 0.0)


class CostModel:
    """Prices per (model, site), computed once from the config."""

    def __init__(self, config: SpillwayConfig):
        self._config = config
        self._prices = {(model.id, site): self.price(model.id, site)
                        for model in config.models for site in model.replicas}

    def hourly(self, site: str) -> float | None:
        """Price of one accelerator-hour on ``site``; None where the site is priced per token."""
        cost = self._config.site(site).cost
        if cost is None or cost.basis not in HOURLY_BASES:
            return None
        return cost.per_accelerator_hour()

    def price(self, model_id: str, site: str, utilisation: float | None = None) -> Price:
        """Price per token of ``model_id`` on ``site``; ``utilisation`` overrides the site's planning
        utilisation (hourly bases only)."""
        site_config = self._config.site(site)
        cost = site_config.cost
        if cost is None or isinstance(cost, FlatCost):  # no `cost`: the cost_per_1k_tokens shorthand
            flat = (site_config.cost_per_1k_tokens if cost is None else cost.per_1k_tokens) / 1000
            return Price(flat, flat)
        if isinstance(cost, ApiCost):
            return Price(cost.input_per_million / 1e6, cost.output_per_million / 1e6)
        model = self._config.model(model_id)
        throughput = model.throughput_on(site)
        if throughput is None:
            raise ValueError(f"model {model_id!r} has no throughput for the hourly site {site!r}")
        share = utilisation if utilisation is not None else cost.utilisation
        if not 0 < share <= 1:
            raise ValueError(f"utilisation must be in (0, 1], got {share}")
        per_second = cost.per_accelerator_hour() * model.accelerators_per_replica(site) / SECONDS_PER_HOUR / share
        return Price(per_second / throughput.input_rate, per_second / throughput.output_tokens_per_s)

    def request_cost(self, model_id: str, site: str, usage: tuple[int, int] | None) -> float:
        """What one finished request cost: its site's prices times its (prompt, completion) tokens."""
        if usage is None:
            return 0.0
        return self._prices.get((model_id, site), FREE).of(*usage)

    def per_1k_output(self, model_id: str, site: str) -> float:
        """The price of 1,000 output tokens, the figure the cost scorer ranks sites by."""
        return self._prices.get((model_id, site), FREE).per_output_token * 1000

    def break_even(self, model_id: str, owned_site: str, other_site: str) -> float | None:
        """The utilisation of ``owned_site`` (amortised) above which its output tokens cost less
        than on ``other_site`` at that site's own planning utilisation; None when the owned site
        is not amortised. A value above 1 means the owned site never breaks even."""
        cost = self._config.site(owned_site).cost
        if cost is None or cost.basis != "amortised":
            return None
        other = self._prices[(model_id, other_site)].per_output_token
        if other <= 0:
            return float("inf")
        at_full = self.price(model_id, owned_site, utilisation=1.0).per_output_token
        return at_full / other


def cost_report(config: SpillwayConfig, utilisation: float | None = None) -> dict:
    """The cost model for the configured fleet (``spillway cost``): each site's basis and price per
    accelerator-hour; per model and site the price per million tokens (owned sites at
    ``utilisation`` when given, else at their planning utilisation); and per model the utilisation
    above which each owned site is cheaper than each other site."""
    costs = CostModel(config)
    sites = []
    for site in config.sites:
        basis = site.cost.basis if site.cost is not None else "per_1k_tokens"
        sites.append({"site": site.name, "kind": site.kind.value, "basis": basis,
                      "per_accelerator_hour": costs.hourly(site.name),
                      "planning_utilisation": getattr(site.cost, "utilisation", None)})
    models = []
    for model in config.models:
        for site_name in model.replicas:
            site_cost = config.site(site_name).cost
            share = getattr(site_cost, "utilisation", None)  # None: priced per token
            if utilisation is not None and isinstance(site_cost, AmortisedCost):
                share = utilisation
            price = costs.price(model.id, site_name, utilisation=share)
            models.append({"model": model.id, "site": site_name, "utilisation": share,
                           "per_million_input": price.per_million_input,
                           "per_million_output": price.per_million_output})
    break_even = []
    for model in config.models:
        for owned in model.replicas:
            for other in model.replicas:
                if other == owned:
                    continue
                share = costs.break_even(model.id, owned, other)
                if share is not None:
                    break_even.append({"model": model.id, "owned_site": owned, "other_site": other,
                                       "utilisation": share})
    return {"sites": sites, "models": models, "break_even": break_even}
