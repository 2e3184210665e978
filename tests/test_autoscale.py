"""Cloud capacity from zero, without Ray: the config rules, the router's demand signal
(``ModelScheduler.scale_demand`` over FAKE engine groups), the scale policy and the scaler that sums
routers' reports, with injected clocks. The whole chain on a real cluster is
``tests/test_e2e_cloud_burst.py``."""

import asyncio

import pytest

from serve_app.config import AutoscalingConfig, SpillwayConfig
from serve_app.ops.autoscale import REPORT_STALE_S, CloudScaler, ScalePolicy
from serve_app.policy.admission import AdmissionParams
from serve_app.policy.classify import DataClass
from serve_app.policy.placement import PlacementPipeline, RequestView
from serve_app.policy.spill import SpillParams
from serve_app.router.groups import EngineGroup
from serve_app.router.scheduler import ModelScheduler, NoHealthyEngine


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def config(**cloud_scaling):
    return {
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"},
                  {"name": "cloud", "resource": "site:cloud", "kind": "cloud", "preference": 1}],
        "models": [{"id": "m", "source": "builtin:dense", "replicas": {"onprem": 1, "cloud": 0},
                    "engine": {"max_num_seqs": 4},
                    "autoscaling": {"cloud": {"max_replicas": 3, "scale_down_idle_s": 30, **cloud_scaling}}}],
    }


# ---- config -------------------------------------------------------------------------------------

def test_config_accepts_cloud_autoscaling_and_marks_the_app_autoscaled():
    cfg = SpillwayConfig.model_validate(config())
    assert cfg.autoscaled and cfg.model("m").deploys_on("cloud")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["models"][0].update(autoscaling={"onprem": {"max_replicas": 2}}), "only cloud sites autoscale"),
    (lambda c: c["models"][0]["replicas"].update(cloud=5), "must lie between"),
    (lambda c: c["models"][0]["autoscaling"]["cloud"].update(min_replicas=4), "min_replicas"),
    (lambda c: c["models"][0].update(autoscaling={"elsewhere": {"max_replicas": 1}}), "not under its replicas"),
    (lambda c: c.update(router={"direct_dispatch": False}), "direct_dispatch"),
])
def test_config_refuses_wrong_autoscaling(change, message):
    raw = config()
    change(raw)
    with pytest.raises(ValueError, match=message):
        SpillwayConfig.model_validate(raw)


def test_a_model_that_lives_only_on_autoscaled_cloud_is_allowed_at_zero():
    raw = config()
    raw["models"][0]["replicas"] = {"cloud": 0}
    assert SpillwayConfig.model_validate(raw).model("m").deploys_on("cloud")


# ---- the router's demand signal -------------------------------------------------------------------

def make_scheduler(clock, onprem_slots=2, cloud_capacity=0, spill_after_ms=1_000):
    groups = [
        EngineGroup("m@onprem", "m", "onprem", 0, DataClass.restricted, 1, onprem_slots),
        EngineGroup("m@cloud", "m", "cloud", 1, DataClass.internal, 0, 4, autoscaled=True),
    ]
    sched = ModelScheduler(
        "m", groups, PlacementPipeline.from_names(), AdmissionParams(max_queue_len=100, max_queue_wait_ms=60_000),
        SpillParams(spill_after_ms=spill_after_ms, close_ratio=0.5, min_hold_ms=1_000, margin_ms=0.0,
                    prior_itl_ms=10.0, prior_ttft_ms=50.0),
        clock=clock)
    sched.set_capacity("m@cloud", cloud_capacity)
    return sched


def req(i, data_class=DataClass.public, sequences=1):
    return RequestView(f"r{i}", "m", data_class, sequences=sequences)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_queued_spillable_requests_that_would_miss_their_budget_want_the_cold_cloud():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock)
        held = [await sched.acquire(req(i), max_tokens=1_000) for i in range(2)]  # on-prem full for ~10 s
        assert sched.scale_demand() == {"m@cloud": 0}
        waiting = [asyncio.create_task(sched.acquire(req(10 + i), max_tokens=1_000)) for i in range(3)]
        confidential = asyncio.create_task(sched.acquire(req(20, DataClass.confidential), max_tokens=1_000))
        await settle()
        assert not any(t.done() for t in [*waiting, confidential])  # the cloud has no replica yet: they wait on-prem
        # The three public requests would start on-prem well past their 1 s budget; the confidential
        # one may never run in the cloud, so it asks for nothing there.
        assert sched.scale_demand() == {"m@cloud": 3}
        sched.set_capacity("m@cloud", 4)  # a cloud replica registered: they spill at once
        await settle()
        assert [t.result().group.site for t in waiting] == ["cloud"] * 3
        assert sched.scale_demand() == {"m@cloud": 3}  # now running there
        for lease in [*held, *(t.result() for t in waiting)]:
            lease.release()
        await confidential
        assert sched.scale_demand() == {"m@cloud": 0}

    asyncio.run(main())


def test_a_request_that_started_on_prem_past_its_budget_counts_once_as_cold_demand():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, spill_after_ms=1_000)
        held = [await sched.acquire(req(i), max_tokens=10) for i in range(2)]
        late = asyncio.create_task(sched.acquire(req(5), max_tokens=10))
        await settle()
        clock.now += 2.0  # it waited 2 s against a 1 s budget, with the cloud cold
        held[0].release()
        await settle()
        assert (await late).group.site == "onprem"
        assert sched.scale_demand() == {"m@cloud": 1}  # the queue is empty now: the miss still shows
        assert sched.scale_demand() == {"m@cloud": 0}  # once
        for lease in [held[1], late.result()]:
            lease.release()

    asyncio.run(main())


def test_requests_that_fit_their_budget_on_prem_ask_for_no_cloud():
    async def main():
        sched = make_scheduler(FakeClock(), spill_after_ms=60_000)
        held = [await sched.acquire(req(i), max_tokens=100) for i in range(2)]
        waiting = asyncio.create_task(sched.acquire(req(5), max_tokens=100))
        await settle()
        assert sched.scale_demand() == {"m@cloud": 0}
        for lease in held:
            lease.release()
        await waiting

    asyncio.run(main())


def test_an_autoscaled_group_at_zero_is_waited_for_not_refused():
    async def main():
        clock = FakeClock()
        groups = [EngineGroup("m@cloud", "m", "cloud", 0, DataClass.internal, 0, 4, autoscaled=True)]
        sched = ModelScheduler("m", groups, PlacementPipeline.from_names(), AdmissionParams(max_queue_wait_ms=60_000),
                               SpillParams(spill_after_ms=1_000), clock=clock)
        sched.set_capacity("m@cloud", 0)
        waiting = asyncio.create_task(sched.acquire(req(0), max_tokens=10))
        await settle()
        assert not waiting.done() and sched.scale_demand() == {"m@cloud": 1}
        sched.set_capacity("m@cloud", 4)
        await settle()
        assert (await waiting).group.site == "cloud"
        # A fixed group with no healthy replica is still refused at once.
        fixed = ModelScheduler("m", [EngineGroup("m@c", "m", "cloud", 0, DataClass.internal, 1, 4)],
                               PlacementPipeline.from_names(), AdmissionParams(), SpillParams(), clock=clock)
        fixed.set_capacity("m@c", 0)
        with pytest.raises(NoHealthyEngine):
            await fixed.acquire(req(1))

    asyncio.run(main())


# ---- policy and scaler ----------------------------------------------------------------------------

def test_scale_policy_goes_up_at_once_and_down_after_the_idle_period_to_the_peak_it_saw():
    policy = ScalePolicy(AutoscalingConfig(min_replicas=0, max_replicas=3, scale_down_idle_s=30), slots_per_replica=4)
    assert policy.decide(0, 0, 0.0) == 0
    assert policy.decide(0, 1, 1.0) == 1          # one waiting sequence: one replica
    assert policy.decide(1, 9, 2.0) == 3          # 9 sequences / 4 slots
    assert policy.decide(3, 50, 3.0) == 3         # never above max_replicas
    assert policy.decide(3, 5, 4.0) == 3          # wants 2: waits
    assert policy.decide(3, 0, 20.0) == 3
    assert policy.decide(3, 0, 33.9) == 3
    assert policy.decide(3, 0, 34.0) == 2         # 30 s below 3; the most it wanted meanwhile was 2
    assert policy.decide(2, 0, 40.0) == 2
    assert policy.decide(2, 5, 50.0) == 2         # demand for 2 back: the idle period restarts
    assert policy.decide(2, 3, 51.0) == 2
    assert policy.decide(2, 0, 80.0) == 2
    assert policy.decide(2, 0, 81.0) == 1         # (it wanted 1 at t=51)
    assert policy.decide(1, 0, 110.0) == 1        # the next step waits a whole period, from t=81
    assert policy.decide(1, 0, 111.0) == 0        # to zero


def test_target_utilisation_asks_for_a_replica_before_the_last_one_is_full():
    policy = ScalePolicy(AutoscalingConfig(max_replicas=4, target_utilisation=0.5), slots_per_replica=8)
    assert [policy.wanted(d) for d in (0, 1, 4, 5, 12, 100)] == [0, 1, 1, 2, 3, 4]


def test_scaler_sums_routers_forgets_silent_ones_and_sets_replicas():
    async def main():
        clock, applied = FakeClock(), []

        async def set_replicas(name, n):
            applied.append((name, n))

        scaler = CloudScaler(SpillwayConfig.model_validate(config(scale_down_idle_s=10)), set_replicas, clock=clock)
        name = "engine-m-cloud"
        assert list(scaler.targets) == [name]
        await scaler.tick()
        assert applied == []  # routers get a moment to report after a (re)start
        clock.now += 3
        await scaler.tick()
        assert applied == [(name, 0)]  # no demand: the count is set (0) once
        scaler.report("router-a", {name: 3, "engine-unknown": 50})  # unknown deployments are ignored
        scaler.report("router-b", {name: 3})
        await scaler.tick()
        assert applied[-1] == (name, 2) and scaler.status()["deployments"][name]["demand"] == 6
        scaler.report("router-a", {name: 0})  # a router's new report replaces its last one
        clock.now += 1
        await scaler.tick()
        assert applied[-1] == (name, 2)  # wants 1, but only since now
        clock.now += REPORT_STALE_S + 0.1  # router-b died: its demand goes with it
        scaler.report("router-a", {name: 0})
        clock.now += 5
        await scaler.tick()
        # 10 s below 2 replicas; the most it wanted meanwhile was 1 (router-b's 3 sequences, then)
        assert applied[-1] == (name, 1) and scaler.status()["routers_reporting"] == 1
        scaler.report("router-a", {name: 0})
        clock.now += 10
        await scaler.tick()
        assert applied[-1] == (name, 0)
        assert [(e["from"], e["to"]) for e in scaler.status()["history"]] == [(None, 0), (0, 2), (2, 1), (1, 0)]

    asyncio.run(main())


def test_a_failed_scale_call_is_retried_on_the_next_tick():
    async def main():
        clock, calls = FakeClock(), []

        async def flaky(name, n):
            calls.append(n)
            if len(calls) == 1:
                raise RuntimeError("controller busy")

        scaler = CloudScaler(SpillwayConfig.model_validate(config()), flaky, clock=clock)
        clock.now += 3
        scaler.report("r", {"engine-m-cloud": 1})
        await scaler.tick()
        await scaler.tick()
        assert calls == [1, 1] and scaler.targets["engine-m-cloud"] == 1 and scaler.errors == 1

    asyncio.run(main())


def test_serves_policy_follows_the_published_target_and_reads_it_at_most_twice_a_second(monkeypatch):
    """``follow_cloud_scaler`` runs in Serve's controller; Ray's KV store is stubbed here."""
    import types

    import ray.experimental.internal_kv as kv

    from serve_app.ops import autoscale

    store, reads = {}, []

    def fake_get(key, namespace=None):
        reads.append((key, namespace))
        return store.get(key)

    monkeypatch.setattr(kv, "_internal_kv_get", fake_get)
    clock = [1000.0]
    monkeypatch.setattr(autoscale.time, "monotonic", lambda: clock[0])
    ctx = types.SimpleNamespace(app_name="app", deployment_name="engine-m-cloud", policy_state={},
                                target_num_replicas=0)
    assert autoscale.follow_cloud_scaler(ctx)[0] == 0  # nothing published yet: the current target
    store[autoscale.scale_key("app", "engine-m-cloud")] = b"2"
    target, state = autoscale.follow_cloud_scaler(types.SimpleNamespace(**{**vars(ctx), "policy_state": {}}))
    assert target == 2 and reads[-1] == ("app/engine-m-cloud", autoscale.SCALE_KV_NAMESPACE)
    store[autoscale.scale_key("app", "engine-m-cloud")] = b"0"
    ctx.policy_state = state
    assert autoscale.follow_cloud_scaler(ctx)[0] == 2 and len(reads) == 2  # read again only after 0.5 s
    clock[0] += autoscale.POLICY_READ_EVERY_S
    assert autoscale.follow_cloud_scaler(ctx)[0] == 0


def test_autoscaled_deployment_gets_serves_bounds_without_serves_delays():
    from serve_app.app import build_app

    app = build_app(SpillwayConfig.model_validate(config()))
    cloud = app._bound_deployment.init_args[1]["m"]["cloud"]._bound_deployment
    scaling = cloud._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (0, 3, 0)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.downscale_to_zero_delay_s) == (0, 0, 0)
    assert app._bound_deployment.init_args[1]["m"]["onprem"]._bound_deployment.num_replicas == 1
