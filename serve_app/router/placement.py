"""From config and engine handles to the router's engine groups and per-model schedulers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from serve_app.config import SiteConfig, SiteKind, SpillwayConfig
from serve_app.governance.cost import CostModel
from serve_app.policy.admission import AdmissionParams
from serve_app.policy.classify import DataClass
from serve_app.policy.placement import PlacementPipeline
from serve_app.policy.registry import make
from serve_app.policy.spill import SpillParams, SpillPredictor
from serve_app.router.groups import EngineGroup
from serve_app.router.scheduler import ModelScheduler


@dataclass(frozen=True)
class EngineTarget:
    """One engine deployment a request may be sent to."""

    group: EngineGroup
    handle: Any  # ray.serve.handle.DeploymentHandle (Any keeps this module free of Ray); None: external
    external: Any = None  # ExternalTransport of an external site (transport/external.py)

    @property
    def app(self) -> str:
        return self.handle.app_name if self.handle is not None else ""

    @property
    def deployment(self) -> str:
        return self.handle.deployment_name if self.handle is not None else self.external.replica


def site_order_key(site: SiteConfig) -> tuple:
    """On-prem kinds first, then ``preference``, then name (a stable order)."""
    return (site.kind != SiteKind.onprem, site.preference, site.name)


def build_targets(config: SpillwayConfig, handles: dict[str, dict[str, Any]]) -> dict[str, dict[str, EngineTarget]]:
    """``{model: {group_id: target}}``; a group's rank is its site's place in the model's site order.
    ``handles`` holds the engine deployments; external sites come from the config (one transport
    per site, shared by its models). An external group has one "replica" of ``max_concurrency``
    slots, shared out between the router replicas."""
    from serve_app.transport.external import ExternalTransport

    targets: dict[str, dict[str, EngineTarget]] = {}
    costs = CostModel(config)
    transports = {s.name: ExternalTransport(s) for s in config.sites if s.kind == SiteKind.external}
    routers = config.router.replicas
    by_model = {model_id: dict(by_site) for model_id, by_site in handles.items()}
    for model in config.models:
        for site_name, count in model.replicas.items():
            if site_name in transports and count > 0:
                by_model.setdefault(model.id, {})[site_name] = None
    for model_id, by_site in by_model.items():
        model = config.model(model_id)
        sites = sorted((config.site(name) for name in by_site), key=site_order_key)
        targets[model_id] = {}
        for rank, site in enumerate(sites):
            group = EngineGroup(
                group_id=f"{model_id}@{site.name}",
                model=model_id,
                site=site.name,
                site_rank=rank,
                trusted_up_to=DataClass[site.trust],
                # An autoscaled group's replicas are whatever discovery finds (none at first).
                replicas=0 if site.name in model.autoscaling else (
                    1 if site.name in transports else model.replicas[site.name]),
                max_num_seqs=max(1, site.external.max_concurrency // routers) if site.name in transports
                else model.engine.max_num_seqs,
                cost_per_1k_tokens=costs.per_1k_output(model_id, site.name),
                autoscaled=site.name in model.autoscaling,
            )
            targets[model_id][group.group_id] = EngineTarget(group, by_site[site.name], transports.get(site.name))
    return targets


def spill_params(config: SpillwayConfig, model_id: str) -> SpillParams:
    model, router = config.model(model_id), config.router
    return SpillParams(
        spill_after_ms=model.spill_after_ms, close_ratio=router.spill_close_ratio,
        min_hold_ms=router.spill_min_hold_ms, margin_ms=router.spill_margin_ms,
        prior_itl_ms=model.prior_itl_ms, prior_ttft_ms=model.prior_ttft_ms,
        assumed_output_tokens=router.assumed_output_tokens, context_tokens=model.engine.max_model_len,
    )


def build_schedulers(
    config: SpillwayConfig, targets: dict[str, dict[str, EngineTarget]], clock: Callable[[], float] = time.monotonic
) -> dict[str, ModelScheduler]:
    router = config.router
    schedulers = {}
    for model_id, by_group in targets.items():
        model = config.model(model_id)
        schedulers[model_id] = ModelScheduler(
            model=model_id,
            groups=[t.group for t in by_group.values()],
            pipeline=PlacementPipeline.from_names(router.filters, router.scorers, params=router.policy_params),
            admission=AdmissionParams(
                max_queue_len=model.queue.max_len,
                max_queue_wait_ms=model.queue.max_wait_ms,
                priority_aging_ms=model.queue.priority_aging_ms,
            ),
            spill=spill_params(config, model_id),
            predictor=make(SpillPredictor, router.spill_predictor, router.policy_params.get(router.spill_predictor)),
            clock=clock,
        )
    return schedulers
