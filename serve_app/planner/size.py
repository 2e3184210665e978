"""Fleet sizing: the cheapest (on-prem replicas, cloud replicas) for one model that meets a p99 TTFT
target on a trace, each candidate simulated with the router's own policies (``sim.py``).

The cloud count is a cap: where the config autoscales the model on the cloud site, the simulation
scales it between 0 and the count (after ``provisioning_delay_s``), else the count runs all along.

A fleet's cost per hour: sites priced per accelerator-hour (amortised on-prem, cloud) pay for the
replica-seconds they ran, busy or idle (x accelerators per replica x the site's hourly price);
sites priced per token (an API, the flat form) pay for what the simulation served there.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from serve_app.config import SpillwayConfig
from serve_app.governance.cost import CostModel
from serve_app.planner.profile import EngineProfile
from serve_app.planner.sim import SimRequest, Simulation


@dataclass(frozen=True)
class Candidate:
    onprem: int
    cloud: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    spill_share: float | None
    rejected: int
    cost_per_hour: float
    meets: bool


def fleet_config(config: SpillwayConfig, model_id: str, replicas: dict[str, int]) -> SpillwayConfig:
    """The config with ``model_id``'s replicas per site replaced (other models untouched); an
    autoscaled site's count becomes its ``max_replicas`` (from zero)."""
    raw = config.model_dump(mode="json", exclude_none=True)
    for model in raw["models"]:
        if model["id"] != model_id:
            continue
        scaling = model.get("autoscaling", {})
        for site, count in replicas.items():
            if site in scaling and count > 0:
                scaling[site].update(min_replicas=0, max_replicas=count)
                model["replicas"][site] = 0
            else:
                scaling.pop(site, None)
                model["replicas"][site] = count
    return SpillwayConfig.model_validate(raw)


def fleet_cost_per_hour(config: SpillwayConfig, model_id: str, replica_seconds: dict[str, float],
                        per_token_cost: float, duration_s: float) -> float:
    costs, model = CostModel(config), config.model(model_id)
    hourly = sum(seconds / duration_s * model.accelerators_per_replica(site) * (costs.hourly(site) or 0.0)
                 for site, seconds in replica_seconds.items())
    return hourly + per_token_cost * 3600 / duration_s


def size(config: SpillwayConfig, profiles: dict[tuple[str, str], EngineProfile], requests: list[SimRequest],
         model_id: str, p99_target_ms: float, onprem_site: str, onprem_counts: range, cloud_site: str | None,
         cloud_counts: range, provisioning_delay_s: float = 60.0, workers: int = 1) -> list[Candidate]:
    """Every candidate fleet, simulated; the caller picks the cheapest that ``meets``. ``workers``
    processes simulate candidates side by side (each simulation is deterministic and on its own,
    so the answer is the same for any number); the trace reaches them by ``fork``, not by pickling."""
    grid = [(onprem, cloud) for onprem in onprem_counts for cloud in (cloud_counts if cloud_site is not None else [0])]
    job = _Job(config, profiles, requests, model_id, p99_target_ms, onprem_site, cloud_site, provisioning_delay_s)
    workers = max(1, min(workers, len(grid)))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [job.candidate(fleet) for fleet in grid]
    global _JOB
    _JOB = job  # (inherited by the forked workers)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_candidate_in_worker, grid))
    finally:
        _JOB = None


@dataclass(frozen=True)
class _Job:
    config: SpillwayConfig
    profiles: dict
    requests: list
    model_id: str
    p99_target_ms: float
    onprem_site: str
    cloud_site: str | None
    provisioning_delay_s: float

    def candidate(self, fleet: tuple[int, int]) -> Candidate:
        onprem, cloud = fleet
        replicas = {self.onprem_site: onprem, **({self.cloud_site: cloud} if self.cloud_site is not None else {})}
        config = fleet_config(self.config, self.model_id, replicas)
        simulation = Simulation(config, self.profiles, self.provisioning_delay_s)
        result = simulation.run(self.requests)
        summary = result.summary(simulation.onprem_sites)
        prices = CostModel(config)  # (once per fleet, not once per site)
        per_token = sum(cost for site, cost in result.cost_by_site.items() if prices.hourly(site) is None)
        rejected = sum(result.rejected.values())
        p99 = summary["ttft_p99_ms"]
        return Candidate(
            onprem, cloud, summary["ttft_p50_ms"], p99, summary["spill_share"], rejected,
            round(fleet_cost_per_hour(config, self.model_id, result.replica_seconds, per_token, result.duration_s), 4),
            meets=p99 is not None and p99 <= self.p99_target_ms and rejected == 0)


_JOB: _Job | None = None


def _candidate_in_worker(fleet: tuple[int, int]) -> Candidate:
    return _JOB.candidate(fleet)


def cheapest(candidates: list[Candidate]) -> Candidate | None:
    meeting = [c for c in candidates if c.meets]
    return min(meeting, key=lambda c: (c.cost_per_hour, c.onprem + c.cloud)) if meeting else None


def plot(candidates: list[Candidate], p99_target_ms: float, path: str) -> None:
    """Cost per hour against p99 TTFT, one point per fleet; the cheapest that meets the target ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for meets, colour, label in ((True, "tab:green", "meets the target"), (False, "tab:red", "misses it")):
        points = [c for c in candidates if c.meets == meets and c.ttft_p99_ms is not None]
        ax.scatter([c.cost_per_hour for c in points], [c.ttft_p99_ms for c in points], c=colour, label=label)
        for c in points:
            ax.annotate(f"{c.onprem}+{c.cloud}", (c.cost_per_hour, c.ttft_p99_ms), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    best = cheapest(candidates)
    if best is not None:
        ax.scatter([best.cost_per_hour], [best.ttft_p99_ms], s=200, facecolors="none", edgecolors="black",
                   label=f"cheapest: {best.onprem} on-prem + {best.cloud} cloud")
    ax.axhline(p99_target_ms, linestyle="--", color="grey", label=f"p99 target {p99_target_ms:g} ms")
    ax.set_xlabel("fleet cost per hour")
    ax.set_ylabel("p99 TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("Fleets simulated with the router's own policies (on-prem + cloud replicas)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
