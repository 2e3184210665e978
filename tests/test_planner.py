"""The capacity planner's simulator: virtual time, and the router's own scheduler and policies
driven by simulated engines (no Ray, no engines)."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.config import SpillwayConfig
from serve_app.planner.profile import EngineProfile
from serve_app.planner.sim import Simulation
from serve_app.planner.traffic import poisson
from serve_app.planner.virtual_time import Stalled, run_virtual
from serve_app.policy.admission import AdmissionQueue
from serve_app.policy.placement import PlacementPipeline
from serve_app.policy.spill import SpillGate
from serve_app.router.scheduler import ModelScheduler

PROFILE = EngineProfile(name="test", source="made up for the test", max_num_seqs=8, prefill_tokens_per_s=4_000,
                        ttft_overhead_ms=20, itl_ms={1: 20, 8: 30})


def config(spill_after_ms: float = 2_000) -> SpillwayConfig:
    return SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1,
                   "cost": {"basis": "per_1k_tokens", "per_1k_tokens": 0.01}}],
        "models": [{"id": "m", "source": "builtin:dense", "replicas": {"onprem": 1, "cloud": 1},
                    "engine": {"max_num_seqs": 8}, "spill_after_ms": spill_after_ms}]})


def simulate(spill_after_ms: float, requests):
    sim = Simulation(config(spill_after_ms), {("m", "onprem"): PROFILE, ("m", "cloud"): PROFILE})
    return sim, sim.run(requests)


def test_virtual_time_jumps_to_the_next_timer_and_a_stalled_simulation_says_so():
    async def an_hour(loop):
        await asyncio.sleep(3_600)
        later = loop.create_future()
        loop.call_later(5, later.set_result, "done")
        return await later, loop.time()

    assert run_virtual(an_hour) == ("done", 3_605.0)

    async def forever(loop):
        await loop.create_future()

    with pytest.raises(Stalled):
        run_virtual(forever)


def test_the_simulation_drives_the_routers_own_scheduler_and_policies():
    sim, result = simulate(2_000, poisson("m", 2, 30, seed=3))
    scheduler = sim.schedulers["m"]
    assert type(scheduler) is ModelScheduler
    assert isinstance(scheduler.pipeline, PlacementPipeline) and isinstance(scheduler.queue, AdmissionQueue)
    assert isinstance(scheduler.gate, SpillGate)
    assert [type(f).__name__ for f in scheduler.pipeline.filters] and result.sites["onprem"] > 0
    assert sum(scheduler.in_flight.values()) == 0  # every lease was given back
    served = [ttft for ttft in result.ttft_ms if ttft is not None]
    assert result.summary({"onprem"})["requests_served"] == len(served) > 40


def test_a_longer_ttft_budget_spills_less_and_waits_longer():
    requests = poisson("m", 5, 300, seed=1, bursts=[(60, 30, 10)])
    shares, p50s = [], []
    for budget_ms in (300, 2_000, 10_000):
        _, result = simulate(budget_ms, requests)
        summary = result.summary({"onprem"})
        shares.append(summary["spill_share"])
        p50s.append(summary["ttft_p50_ms"])
        assert summary["residency_violations"] == 0
    assert shares[0] > shares[1] > shares[2] > 0
    assert p50s[0] < p50s[1] < p50s[2]


def test_confidential_requests_stay_on_prem_under_saturation_and_cloud_costs_show():
    requests = poisson("m", 6, 120, seed=2, confidential_share=0.3)
    _, result = simulate(300, requests)
    summary = result.summary({"onprem"})
    assert result.sites_by_class[("confidential", "cloud")] == 0
    assert result.sites_by_class[("confidential", "onprem")] > 0 and result.sites_by_class[("public", "cloud")] > 0
    assert summary["residency_violations"] == 0 and summary["cost_per_hour"] > 0


def test_profiles_interpolate_time_per_token_between_batch_sizes():
    assert PROFILE.itl_at(1) == 20 and PROFILE.itl_at(8) == 30 and PROFILE.itl_at(64) == 30
    assert PROFILE.itl_at(4) == pytest.approx(20 + 3 / 7 * 10)
    assert PROFILE.ttft_ms(400) == pytest.approx(120)


def test_plan_simulate_command_prints_the_planners_figures(capsys):
    from serve_app.ops.cli import main

    assert main(["plan", "simulate", "--rate", "3", "--duration-s", "60", "--confidential-share", "0.2",
                 "--burst", "20,10,20", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["requests_served"] == figures["requests"] > 100
    assert figures["residency_violations"] == 0 and figures["ttft_p99_ms"] >= figures["ttft_p50_ms"] > 0
    assert 0 < figures["onprem_share"] <= 1 and figures["cost_per_hour"] > 0
    by_class = figures["ttft_p99_ms_confidential"], figures["ttft_p99_ms_public"]  # two classes: each its own tail
    assert min(by_class) <= figures["ttft_p99_ms"] <= max(by_class)
    assert main(["plan", "simulate", "--profiles", "/nonexistent.yaml"]) == 2


def test_sizing_finds_the_cheapest_fleet_that_meets_the_target_and_draws_the_curve(tmp_path):
    from serve_app.planner.size import cheapest, fleet_cost_per_hour, plot, size

    base = SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem",
                   "cost": {"basis": "amortised", "accelerator_price": 36_000, "lifetime_years": 4, "power_kw": 1.0,
                            "pue": 1.5, "power_price_per_kwh": 0.1, "operations_per_hour": 0.3}},
                  {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1,
                   "cost": {"basis": "cloud", "on_demand_per_hour": 10.0, "spot_per_hour": 4.0}}],
        "models": [{"id": "m", "source": "builtin:dense", "replicas": {"onprem": 1, "cloud": 0},
                    "engine": {"max_num_seqs": 8}, "throughput": {"output_tokens_per_s": 1_000}}]})
    hourly_onprem = 36_000 / (4 * 8_766) + 1.0 * 1.5 * 0.1 + 0.3
    # two on-prem replicas all along, one cloud replica half the time
    assert fleet_cost_per_hour(base, "m", {"onprem": 120, "cloud": 30}, 0.0, 60) == pytest.approx(
        2 * hourly_onprem + 10 / 2)
    profiles = {("m", "onprem"): PROFILE, ("m", "cloud"): PROFILE}
    requests = poisson("m", 6, 60, seed=4)
    candidates = size(base, profiles, requests, "m", 1_000, "onprem", range(1, 4), "cloud", range(0, 2))
    assert len(candidates) == 6
    best = cheapest(candidates)
    assert best is not None and best.meets and best.ttft_p99_ms <= 1_000
    assert all(c.cost_per_hour >= best.cost_per_hour for c in candidates if c.meets)
    # more replicas never make the simulated p99 worse on the same trace
    alone = {c.onprem: c.ttft_p99_ms for c in candidates if c.cloud == 0}
    assert alone[1] >= alone[2] >= alone[3]
    plot(candidates, 1_000, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # candidates simulated in worker processes: the same answers, in the same order
    assert size(base, profiles, requests, "m", 1_000, "onprem", range(1, 4), "cloud", range(0, 2),
                workers=3) == candidates


def test_autoscaled_cloud_capacity_arrives_after_the_provisioning_delay_and_leaves_when_idle():
    raw = config(300).model_dump(mode="json", exclude_none=True)
    raw["models"][0]["replicas"] = {"onprem": 1, "cloud": 0}
    raw["models"][0]["autoscaling"] = {"cloud": {"min_replicas": 0, "max_replicas": 2, "scale_down_idle_s": 20}}
    scaled = SpillwayConfig.model_validate(raw)
    requests = poisson("m", 2, 300, seed=5, bursts=[(50, 40, 20)])
    profiles = {("m", "onprem"): PROFILE, ("m", "cloud"): PROFILE}
    slow = Simulation(scaled, profiles, provisioning_delay_s=30).run(requests)
    fast = Simulation(scaled, profiles, provisioning_delay_s=1).run(requests)
    ups = [event for event in slow.scale_events if event[3] > event[2]]
    downs = [event for event in slow.scale_events if event[3] < event[2]]
    assert ups and ups[0][0] >= 50 and downs and downs[-1][3] == 0  # up in the burst, back to zero after it
    assert slow.sites["cloud"] > 0 and slow.sites_by_class[("confidential", "cloud")] == 0
    assert 0 < slow.replica_seconds["cloud"] < 2 * 300  # paid only while scaled up
    assert slow.replica_seconds["onprem"] == pytest.approx(300, rel=0.01)
    # capacity that comes sooner serves the burst sooner
    assert fast.percentile(99) < slow.percentile(99)


def test_an_external_api_site_is_a_spill_target_with_its_own_latency_and_price():
    fleet = SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "api", "kind": "external", "preference": 2,
                   "cost": {"basis": "api", "input_per_million": 2.5, "output_per_million": 10.0},
                   "external": {"base_url": "https://api.example.com/v1", "max_concurrency": 16}}],
        "models": [{"id": "m", "source": "builtin:dense", "replicas": {"onprem": 1, "api": 1},
                    "engine": {"max_num_seqs": 8}, "spill_after_ms": 500}]})
    api = EngineProfile(name="api", source="made up for the test", max_num_seqs=16, prefill_tokens_per_s=50_000,
                        ttft_overhead_ms=400, itl_ms={1: 15})
    result = Simulation(fleet, {("m", "onprem"): PROFILE, ("m", "api"): api}).run(
        poisson("m", 4, 200, seed=6, confidential_share=0.2, bursts=[(50, 30, 15)]))
    assert result.sites["api"] > 0 and result.sites_by_class[("confidential", "api")] == 0
    assert result.cost_by_site["api"] > 0 and result.cost_by_site["onprem"] == 0  # on-prem has no price here
    assert result.residency_violations == 0


def _record(start, status=200, ok=True, **fields):
    return {"start": start, "model": "spillway-dense", "status": status, "ok": ok, "ttft_ms": 50.0,
            "prompt_tokens": 40, "max_tokens": 16, "output_tokens": 16, "site": "onprem", "spill_reason": "none",
            "data_class": "public", **fields}


def test_a_recorded_load_test_replays_with_its_arrivals_lengths_and_data_classes(tmp_path):
    from serve_app.planner.traffic import replay

    records = [_record(1000.5), _record(1000.0, prompt_tokens=None, status=429, ok=False, ttft_ms=None),
               _record(1001.0, data_class="confidential", output_tokens=7),
               _record(1002.0, status=401, ok=False), _record(1003.0, data_class="secret")]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{\"start\": 10")
    trace = replay(tmp_path, models={"spillway-dense": "m"})  # (a report folder is enough)
    assert [r.arrival_s for r in trace.requests] == [0.0, 0.5, 1.0]  # relative to the first, sorted
    assert {r.model for r in trace.requests} == {"m"}
    first, second, third = trace.requests
    assert (first.prompt_tokens, first.max_tokens, first.output_tokens) == (40, 16, 16)  # a 429: its max_tokens
    assert trace.prompt_tokens_estimated == 1 and second.prompt_tokens == 40  # (the median of the known ones)
    assert third.output_tokens == 7 and third.data_class.name == "confidential"
    assert trace.skipped == {"status 401": 1, "unknown data class": 1, "unreadable line": 1}


def test_plan_accuracy_compares_a_replayed_run_with_what_it_measured(tmp_path, capsys):
    from serve_app.ops.cli import main

    config_path, profiles_path = tmp_path / "config.yaml", tmp_path / "profiles.yaml"
    config_path.write_text(json.dumps(config().model_dump(mode="json", exclude_none=True)))
    profiles_path.write_text(json.dumps({"profiles": {"p": PROFILE.model_dump(mode="json", exclude={"name"})},
                                         "use": {"m": {"onprem": "p", "cloud": "p"}}}))
    # A quiet run: one request every 2 s, each alone on on-prem; 20 % were confidential.
    records = [_record(100.0 + 2 * i, model="m", ttft_ms=200.0, itl_ms=5.0,
                       data_class="confidential" if i % 5 == 0 else "public") for i in range(50)]
    # Five streams a starved client read in one go: a "first token" of 3 s, no time between tokens.
    records += [_record(101.0 + 20 * i, model="m", ttft_ms=3000.0, itl_ms=0.0) for i in range(5)]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    args = ["plan", "accuracy", "--config", str(config_path), "--profiles", str(profiles_path),
            "--trace", str(tmp_path / "requests.jsonl")]
    assert main(args + ["--json"]) == 0
    rows = {row["metric"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    # Simulated alone on on-prem: 20 ms + 40 tokens at 4,000/s = 30 ms, against the 200 ms measured.
    assert rows["ttft_p50_ms"]["simulated"] == pytest.approx(30.0) and rows["ttft_p50_ms"]["measured"] == 200.0
    assert rows["ttft_p50_ms"]["error"] == pytest.approx(-0.85)
    assert rows["ttft_p99_ms"]["measured"] == 3000.0 and rows["live_ttft_p99_ms"]["measured"] == 200.0
    assert rows["live_ttft_p50_ms"]["simulated"] == pytest.approx(30.0)
    assert rows["onprem_share"]["simulated"] == rows["onprem_share"]["measured"] == 1.0
    assert rows["spill_share"]["simulated"] == 0 and rows["spill_share"]["error"] is None  # (measured 0)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| ttft_p50_ms | 200.0 | 30.0 | -85.0 % |" in out and "| spill_share | 0.0 % | 0.0 % | +0.0 pts |" in out


def test_plan_simulate_replays_a_trace_and_names_a_model_the_config_lacks(tmp_path, capsys):
    from serve_app.ops.cli import main

    config_path, profiles_path = tmp_path / "config.yaml", tmp_path / "profiles.yaml"
    config_path.write_text(json.dumps(config().model_dump(mode="json", exclude_none=True)))
    profiles_path.write_text(json.dumps({"profiles": {"p": PROFILE.model_dump(mode="json", exclude={"name"})},
                                         "use": {"m": {"onprem": "p", "cloud": "p"}}}))
    trace = tmp_path / "requests.jsonl"
    trace.write_text("\n".join(json.dumps(_record(i * 0.05, data_class="confidential" if i % 2 else "public"))
                               for i in range(200)))
    args = ["plan", "simulate", "--config", str(config_path), "--profiles", str(profiles_path),
            "--trace", str(trace), "--json"]
    assert main(args) != 0
    assert "spillway-dense, not a model of the config" in capsys.readouterr().err
    assert main(args + ["--trace-model", "spillway-dense=m"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"] == summary["requests_served"] == 200
    assert summary["residency_violations"] == 0 and summary["sites"].get("cloud", 0) > 0  # 20 req/s: it spills
    assert summary["simulated_s"] == pytest.approx(9.95, abs=0.06)


def test_a_sequence_starts_on_a_least_loaded_replica_and_its_batch_is_that_replicas():
    from serve_app.planner.sim import SimGroup

    group = SimGroup(PROFILE, replicas=3, max_num_seqs=8)
    started = [group.start() for _ in range(4)]
    assert sorted(batch for _, batch in started) == [1, 1, 1, 2]  # spread first, then doubled up
    assert len({replica for replica, _ in started[:3]}) == 3 and group.running == 4 and group.mean_batch() == 2
    alone = next(replica for replica, batch in started if batch == 1 and replica != started[3][0])
    group.finish(alone)
    assert group.start() == (alone, 1)  # the freed replica is the least loaded again
    group.remove_idle(3)
    assert group.replicas == 3  # (none is idle: busy replicas stay)
    for replica, _ in started:
        if replica != alone:
            group.finish(replica)
    group.remove_idle(3)
    assert group.replicas == 1 and group.capacity == 8 and group.running == 1


def test_the_published_gpu_profiles_load_and_size_the_hybrid_gpu_fleet():
    from pathlib import Path

    from serve_app.config import load_config
    from serve_app.planner.cli import load_profiles

    root = Path(__file__).resolve().parent.parent / "cluster_configs"
    profiles = load_profiles(root / "profiles" / "published-gpu.yaml")
    assert all(p.source and p.itl_ms for p in profiles.values())
    fleet = load_config(root / "hybrid-gpu.yaml")
    # A burst past the two on-prem H100s' 256 slots: the cloud's L4s start from zero (10 s) and take the spill.
    requests = poisson("llama-3.1-8b", 50, 150, max_tokens="lognormal:200,0.5", confidential_share=0.2, seed=4,
                       bursts=[(30, 90, 250)])
    result = Simulation(fleet, profiles, provisioning_delay_s=10).run(requests)
    summary = result.summary({"onprem"})
    assert summary["requests_served"] + sum(result.rejected.values()) == len(requests)
    assert summary["residency_violations"] == 0 and result.sites_by_class[("confidential", "cloud")] == 0
    assert result.sites_by_class[("public", "cloud")] > 1_000 and result.scale_events


def _run_by_batch():
    """A run on one on-prem replica: 10 times, 4 requests reach the engine together (they met 1, 2,
    3 and 4 running sequences, themselves included); each batch's first token (after 5 ms in the
    router's queue) and time per token are set per batch."""
    shape = {1: (100.0, 10.0), 2: (150.0, 12.0), 3: (300.0, 20.0), 4: (300.0, 20.0)}  # batch -> (ttft, itl)
    records = []
    for group in range(10):
        for batch in (1, 2, 3, 4):
            ttft, itl = shape[batch]
            e2e = 5 + ttft + 15 * itl
            records.append(_record(1000.0 + 10 * group, model="m", queue_ms=5.0, ttft_ms=5 + ttft, e2e_ms=e2e,
                                   end=1000.0 + 10 * group + e2e / 1000, output_tokens=16))
    records.append(_record(2000.0, model="m", site="cloud", ttft_ms=1.0, end=2000.1, e2e_ms=100.0))  # elsewhere
    return records


def test_the_batch_a_request_met_counts_the_sequences_running_on_the_replicas_when_it_started():
    from serve_app.planner.fit import batches, served_on

    records = _run_by_batch()
    served = served_on(records, "m", "onprem")
    assert len(served) == 40 and served[0].ttft_ms == 100.0 and served[0].itl_ms == pytest.approx(10.0)
    assert batches(served, replicas=1)[:8] == [1, 2, 3, 4, 1, 2, 3, 4]  # the group before had ended
    assert batches(served, replicas=2)[:4] == [1, 1, 2, 2]  # least loaded of two replicas


def test_a_profile_fitted_to_a_recorded_run_is_the_run_as_its_engines_served_it(tmp_path):
    """``plan profile --from-trace``: time per token and the first token by batch, as that run's
    engines showed them (the router's queue left out), the prefill speed from a measured profile."""
    from serve_app.ops.cli import main
    from serve_app.planner.cli import load_profiles

    config_path, base_path, out = tmp_path / "config.yaml", tmp_path / "base.yaml", tmp_path / "fitted.yaml"
    config_path.write_text(json.dumps(config().model_dump(mode="json", exclude_none=True)))
    base_path.write_text(json.dumps({"profiles": {"p": PROFILE.model_dump(mode="json", exclude={"name"})},
                                     "use": {"m": {"onprem": "p"}}}))
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in _run_by_batch()))
    assert main(["plan", "profile", "--config", str(config_path), "--model", "m", "--from-trace",
                 str(tmp_path / "requests.jsonl"), "--base", str(base_path), "--out", str(out)]) == 0
    fitted = load_profiles(out)[("m", "onprem")]
    assert fitted.itl_ms == {1: 10.0, 2: 12.0, 4: 20.0}  # batches 3 and 4 fall in the bucket of 4
    assert fitted.ttft_extra_ms == {1: 0.0, 2: 50.0, 4: 200.0}
    assert fitted.prefill_tokens_per_s == PROFILE.prefill_tokens_per_s
    assert fitted.ttft_overhead_ms == 90.0  # 100 ms at batch 1, less 40 prompt tokens at 4,000/s
    assert fitted.ttft_ms(40, 3) == pytest.approx(90 + 10 + 125)  # (the extra interpolated between 2 and 4)
    assert load_profiles(out)[("m", "cloud")] == fitted  # every site of the model uses it
    # A starved client read the batch-3 and -4 streams in one go (no time between their tokens, and
    # their "first token" when it got round to reading): that bucket says nothing of the engine's
    # speed or first token. The base profile's time per token is kept there, and the first token
    # comes from the buckets beside it; a bucket with a few late streams among live ones fits the live.
    from serve_app.planner.fit import fit

    late = [{**r, "ttft_ms": 2005.0, "e2e_ms": 2005.0} if r["ttft_ms"] == 305.0 else r for r in _run_by_batch()]
    refit = fit(late, "m", "onprem", 1, 8, PROFILE, "late", "test")
    assert refit.itl_ms == {1: 10.0, 2: 12.0, 4: round(PROFILE.itl_at(4), 2)}
    assert refit.ttft_extra_ms == {1: 0.0, 2: 50.0}
    some_late = [{**r, "ttft_ms": 2005.0, "e2e_ms": 2005.0} if r["ttft_ms"] == 155.0 and r["start"] < 1050 else r
                 for r in _run_by_batch()]
    assert fit(some_late, "m", "onprem", 1, 8, PROFILE, "some", "test").ttft_extra_ms == {1: 0.0, 2: 50.0, 4: 200.0}
    assert main(["plan", "profile", "--config", str(config_path), "--model", "m", "--site", "cloud",
                 "--from-trace", str(tmp_path / "requests.jsonl"), "--base", str(base_path)]) == 2  # no base profile

