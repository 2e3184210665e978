"""Progressive rollouts without Ray: the step logic over routers' counters (injected clock), the
operator that starts, judges and publishes, and the routers' side (weights applied in place, users
only ever moving from stable to canary as its share grows). The real cluster:
``tests/test_e2e_rollout.py``."""

import asyncio

import pytest
from pydantic import ValidationError

from serve_app.config import SpillwayConfig
from serve_app.errors import InvalidRequest, NotFound
from serve_app.ops.operator import Operator
from serve_app.ops.rollout import ABORTED, PROMOTED, ROLLED_BACK, RUNNING, Counts, Rollout, RolloutSpec
from serve_app.policy.splits import TrafficSplit, Variant

STABLE, CANARY = "m-stable", "m-canary"


def spec(**overrides) -> RolloutSpec:
    fields = dict(alias="chat", stable=STABLE, canary=CANARY, steps=[10, 50, 100], step_s=10, min_requests=10)
    return RolloutSpec(**{**fields, **overrides})


class Traffic:
    """Cumulative per-router counters, as routers report them."""

    def __init__(self):
        self.routers = {"r1": {STABLE: Counts(), CANARY: Counts()}, "r2": {STABLE: Counts(), CANARY: Counts()}}

    def serve(self, variant: str, n: int, errors: int = 0, ttft_ms: float = 100.0, router: str = "r1"):
        c = self.routers[router][variant]
        self.routers[router][variant] = Counts(c.requests + n, c.errors + errors, c.ttft_ms_total + n * ttft_ms,
                                               c.ttft_count + n)


@pytest.mark.parametrize("bad", [dict(steps=[50, 25, 100]), dict(steps=[10, 50]), dict(steps=[0, 100]),
                                 dict(canary=STABLE), dict(max_step_s=5)])
def test_spec_refuses_nonsense(bad):
    with pytest.raises(ValidationError):
        spec(**bad)


def test_a_healthy_canary_is_raised_step_by_step_and_promoted():
    traffic, rollout = Traffic(), Rollout(spec(), started_at=0.0)
    rollout.begin(traffic.routers)
    assert rollout.weights() == {STABLE: 90.0, CANARY: 10.0}
    traffic.serve(STABLE, 40, router="r1")
    traffic.serve(CANARY, 6, router="r1")
    traffic.serve(CANARY, 6, router="r2")  # 12 canary requests, over two routers
    assert not rollout.advance(5.0, traffic.routers)  # step_s not over yet
    assert rollout.advance(10.0, traffic.routers) and rollout.share == 50
    assert rollout.status(10.0)["window"][CANARY]["requests"] == 12
    # The next step is judged on what it serves itself: the 12 earlier canary requests do not count.
    traffic.serve(CANARY, 5)
    traffic.serve(STABLE, 20)
    assert not rollout.advance(21.0, traffic.routers)  # 5 < min_requests: it waits for traffic
    traffic.serve(CANARY, 5)
    assert rollout.advance(22.0, traffic.routers) and rollout.share == 100
    traffic.serve(CANARY, 10)  # at 100 % the stable serves nothing; only the canary must show up
    assert rollout.advance(32.0, traffic.routers)
    assert rollout.state == PROMOTED and rollout.weights() == {STABLE: 0.0, CANARY: 100.0}
    assert [e["event"] for e in rollout.history][-1].startswith("promoted")


def test_a_canary_that_errors_rolls_back_at_once_mid_step():
    traffic, rollout = Traffic(), Rollout(spec(), started_at=0.0)
    rollout.begin(traffic.routers)
    traffic.serve(STABLE, 30, errors=0)
    traffic.serve(CANARY, 10, errors=3)
    assert rollout.advance(2.0, traffic.routers)  # long before step_s: enough evidence
    assert rollout.state == ROLLED_BACK and rollout.weights() == {STABLE: 100.0, CANARY: 0.0}
    assert "server-error rate 30.0%" in rollout.reason


def test_a_slow_canary_rolls_back_at_the_end_of_its_step():
    traffic, rollout = Traffic(), Rollout(spec(max_ttft_ratio=1.5), started_at=0.0)
    rollout.begin(traffic.routers)
    traffic.serve(STABLE, 30, ttft_ms=100)
    traffic.serve(CANARY, 10, ttft_ms=140)
    assert rollout.advance(10.0, traffic.routers) and rollout.share == 50  # 1.4x: within bounds
    traffic.serve(STABLE, 30, ttft_ms=100)
    traffic.serve(CANARY, 10, ttft_ms=200)
    assert rollout.advance(15.0, traffic.routers)
    assert rollout.state == ROLLED_BACK and "mean TTFT 200 ms > 1.5 x stable 100 ms" in rollout.reason


def test_errors_the_stable_has_too_are_not_the_canarys_fault():
    traffic, rollout = Traffic(), Rollout(spec(), started_at=0.0)
    rollout.begin(traffic.routers)
    traffic.serve(STABLE, 100, errors=10)
    traffic.serve(CANARY, 10, errors=1)
    assert rollout.advance(10.0, traffic.routers) and rollout.share == 50


def test_too_little_traffic_rolls_back_at_the_step_deadline():
    traffic, rollout = Traffic(), Rollout(spec(max_step_s=30), started_at=0.0)
    rollout.begin(traffic.routers)
    traffic.serve(STABLE, 50)
    traffic.serve(CANARY, 3)
    assert not rollout.advance(20.0, traffic.routers)
    assert rollout.advance(30.0, traffic.routers) and rollout.state == ROLLED_BACK
    assert "too little traffic" in rollout.reason


def test_a_router_that_restarted_counts_from_zero_never_negative():
    traffic, rollout = Traffic(), Rollout(spec(), started_at=0.0)
    traffic.serve(STABLE, 500)
    traffic.serve(CANARY, 50)
    rollout.begin(traffic.routers)
    traffic.routers["r1"] = {STABLE: Counts(5, 0, 500.0, 5), CANARY: Counts(4, 0, 400.0, 4)}  # restarted
    window = rollout.window(traffic.routers)
    assert (window[STABLE].requests, window[CANARY].requests) == (5, 4)


# ---- the operator ---------------------------------------------------------------------------------

def config() -> SpillwayConfig:
    return SpillwayConfig.model_validate({
        "sites": [{"name": "onprem", "resource": "site:onprem", "kind": "onprem"}],
        "models": [{"id": STABLE, "source": "builtin:dense", "replicas": {"onprem": 1}},
                   {"id": CANARY, "source": "builtin:dense", "replicas": {"onprem": 1}}]})


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def report(operator: Operator, traffic: Traffic):
    for router, by_variant in traffic.routers.items():
        operator.report(router, {}, {"chat": {v: {"requests": c.requests, "server_errors": c.errors,
                                                  "ttft_ms_total": c.ttft_ms_total, "ttft_count": c.ttft_count}
                                              for v, c in by_variant.items()}})


def test_operator_starts_judges_publishes_and_aborts():
    async def main():
        clock, published, traffic = Clock(), [], Traffic()

        async def publish(alias, weights):
            published.append((alias, dict(weights)))

        operator = Operator(config(), publish, clock=clock)
        assert operator.scaler is None  # nothing autoscales in this config
        with pytest.raises(NotFound):
            await operator.start_rollout(spec(canary="missing"))
        with pytest.raises(InvalidRequest, match="is a model id"):
            await operator.start_rollout(RolloutSpec(alias=STABLE, stable=STABLE, canary=CANARY))
        status = await operator.start_rollout(spec())
        assert status["state"] == RUNNING and published[-1] == ("chat", {STABLE: 90.0, CANARY: 10.0})
        with pytest.raises(InvalidRequest, match="abort it first"):
            await operator.start_rollout(spec())
        traffic.serve(STABLE, 30)
        traffic.serve(CANARY, 10)
        report(operator, traffic)
        clock.now = 10.0
        await operator.tick()
        assert published[-1] == ("chat", {STABLE: 50.0, CANARY: 50.0})
        await operator.abort_rollout("chat")
        assert published[-1] == ("chat", {STABLE: 100.0, CANARY: 0.0})
        assert operator.rollout_status()[0]["state"] == ABORTED
        await operator.start_rollout(spec())  # a finished rollout may be started again
        with pytest.raises(NotFound):
            await operator.abort_rollout("other")

    asyncio.run(main())


# ---- the routers' side ------------------------------------------------------------------------------

def test_raising_the_canary_share_only_moves_users_from_stable_to_canary():
    split = TrafficSplit("chat", [Variant(STABLE, 95), Variant(CANARY, 5)])
    users = [f"user-{i}" for i in range(2_000)]
    before = {u: split.choose(u) for u in users}
    for share in (25, 50, 100):
        split.set_weights({STABLE: 100 - share, CANARY: share})
        now = {u: split.choose(u) for u in users}
        assert all(now[u] == CANARY for u in users if before[u] == CANARY)  # no canary user goes back
        assert abs(sum(v == CANARY for v in now.values()) / len(users) - share / 100) < 0.05
        before = now
    split.set_weights({STABLE: 100, CANARY: 0})  # rolled back: nobody on the canary
    assert {split.choose(u) for u in users} == {STABLE}


def test_gateway_applies_published_weights_in_place_and_ignores_unknown_models():
    from serve_app.pipeline.gateway import Gateway

    handles = {m: {"onprem": _NamedHandle(f"engine-{m}-onprem")} for m in (STABLE, CANARY)}
    gateway = Gateway(config(), handles, metrics=_NoMetrics())
    gateway.apply_split_weights({"chat": {STABLE: 90, CANARY: 10}, STABLE: {CANARY: 100},
                                 "ghost": {"nope": 100}})
    assert set(gateway.splits) == {"chat"}  # a model id is never an alias; unknown models are dropped
    split = gateway.splits["chat"]
    split.record(CANARY, server_error=True, ttft_ms=50.0)
    gateway.apply_split_weights({"chat": {STABLE: 50, CANARY: 50}})
    assert gateway.splits["chat"] is split and split.counters()[CANARY]["server_errors"] == 1
    assert {m["id"] for m in gateway.models()} >= {"chat"}


class _NamedHandle:
    """Only names a deployment (nothing is sent in this test)."""

    def __init__(self, deployment: str):
        self.app_name, self.deployment_name = "spillway", deployment


class _NoMetrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None
