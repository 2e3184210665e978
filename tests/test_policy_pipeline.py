"""Placement pipeline with fake replicas and an injected clock: residency, slots, spill with
hysteresis, affinity, registry errors, sticky splits. No Ray needed."""

import collections
import random

import pytest

from serve_app.errors import ConfigError
from serve_app.policy.classify import DataClass
from serve_app.policy.pipeline import (
    Filter,
    PlacementPipeline,
    ReplicaView,
    RequestView,
    SpillGate,
    SpillParams,
    predicted_wait_ms,
)
from serve_app.policy.splits import TrafficSplit, Variant


def fake_replicas(onprem_in_flight=0, cloud_in_flight=0, slots=4, model="m"):
    """FAKE replicas for unit tests: two on-prem (trusted up to restricted), one cloud (public/internal)."""
    return [
        ReplicaView("onprem-a", model, "onprem", 0, DataClass.restricted, slots, min(onprem_in_flight, slots)),
        ReplicaView("onprem-b", model, "onprem", 0, DataClass.restricted, slots, max(0, onprem_in_flight - slots)),
        ReplicaView("cloud-a", model, "cloud", 1, DataClass.internal, slots, cloud_in_flight),
    ]


@pytest.fixture
def pipeline():
    return PlacementPipeline.from_names()


def test_low_load_stays_on_the_preferred_site(pipeline):
    for i in range(8):
        decision = pipeline.place(RequestView(f"r{i}", "m", allow_spill=True), fake_replicas(onprem_in_flight=i))
        assert decision.replica.site == "onprem" and decision.reason == "preferred"


def test_full_onprem_without_spill_means_wait_not_cloud(pipeline):
    decision = pipeline.place(RequestView("r", "m", allow_spill=False), fake_replicas(onprem_in_flight=8))
    assert decision.replica is None
    assert decision.reason == "no replica passed spill"


def test_full_onprem_with_spill_open_goes_to_cloud(pipeline):
    decision = pipeline.place(RequestView("r", "m", allow_spill=True), fake_replicas(onprem_in_flight=8))
    assert decision.replica.site == "cloud" and decision.reason == "spill"


@pytest.mark.parametrize("data_class", [DataClass.confidential, DataClass.restricted])
def test_residency_never_spills_sensitive_data(pipeline, data_class):
    for onprem_load in range(0, 9):
        decision = pipeline.place(
            RequestView("r", "m", data_class=data_class, allow_spill=True), fake_replicas(onprem_in_flight=onprem_load)
        )
        assert decision.replica is None or decision.replica.site == "onprem"
    full = pipeline.place(RequestView("r", "m", data_class=data_class, allow_spill=True), fake_replicas(onprem_in_flight=8))
    assert full.replica is None  # waits (or is refused) rather than leaving on-prem


def test_unhealthy_and_kv_full_replicas_are_skipped(pipeline):
    replicas = fake_replicas()
    replicas[0] = ReplicaView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, 0, healthy=False)
    replicas[1] = ReplicaView("onprem-b", "m", "onprem", 0, DataClass.restricted, 4, 0, kv_cache_usage=0.99)
    assert pipeline.place(RequestView("r", "m", allow_spill=True), replicas).replica.replica_id == "cloud-a"


def test_slots_are_never_exceeded(pipeline):
    replicas = fake_replicas(slots=2)
    in_flight = collections.Counter()
    placed = 0
    for i in range(20):
        view = [ReplicaView(r.replica_id, r.model, r.site, r.site_rank, r.trusted_up_to, r.slots, in_flight[r.replica_id])
                for r in replicas]
        decision = pipeline.place(RequestView(f"r{i}", "m", allow_spill=True), view)
        if decision.replica:
            in_flight[decision.replica.replica_id] += 1
            placed += 1
    assert placed == 6 and all(v <= 2 for v in in_flight.values())


def view(a_in_flight, b_in_flight):
    return [
        ReplicaView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, a_in_flight),
        ReplicaView("onprem-b", "m", "onprem", 0, DataClass.restricted, 4, b_in_flight),
    ]


def test_affinity_keeps_a_session_on_its_replica(pipeline):
    first = pipeline.place(RequestView("r1", "m", affinity_key="sess-1"), view(3, 0))
    assert first.replica.replica_id == "onprem-b"  # least loaded at the time
    # Now onprem-a is the less loaded one: a new session goes there, the old one stays on b.
    assert pipeline.place(RequestView("r2", "m"), view(0, 2)).replica.replica_id == "onprem-a"
    assert pipeline.place(RequestView("r3", "m", affinity_key="sess-1"), view(0, 2)).replica.replica_id == "onprem-b"
    # Affinity never overrides a full replica.
    assert pipeline.place(RequestView("r4", "m", affinity_key="sess-1"), view(0, 4)).replica.replica_id == "onprem-a"


def test_unknown_policy_names_fail_at_startup():
    with pytest.raises(ConfigError, match="Unknown filter policy 'geo'; known: free_slot, health, residency, spill"):
        PlacementPipeline.from_names(filters=["residency", "geo"])
    with pytest.raises(ConfigError, match="invalid parameters for filter policy 'free_slot'"):
        PlacementPipeline.from_names(params={"free_slot": {"max_kv_cache_usage": 3}})
    assert Filter.registered() == ["free_slot", "health", "residency", "spill"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_spill_gate_has_hysteresis():
    clock = FakeClock()
    gate = SpillGate(SpillParams(spill_after_ms=1000, close_ratio=0.5, min_hold_ms=3000), clock=clock)
    assert gate.update(900) is False
    assert gate.update(1200) is True          # opens above spill_after_ms
    assert gate.update(800) is True           # between close threshold and open threshold: stays open
    clock.now += 1.0
    assert gate.update(400) is True           # below close threshold, but not for min_hold_ms yet
    clock.now += 2.0
    assert gate.update(450) is True
    clock.now += 0.5
    assert gate.update(700) is True           # bounced above close threshold: hold timer resets
    clock.now += 1.0
    assert gate.update(300) is True
    clock.now += 3.0
    assert gate.update(300) is False          # closed after holding low for 3 s
    assert gate.update(1000) is False         # equal is not above


def test_predicted_wait():
    assert predicted_wait_ms(queued_ahead=0, free_slots=1, total_slots=8, mean_service_ms=800) == 0
    assert predicted_wait_ms(queued_ahead=7, free_slots=0, total_slots=8, mean_service_ms=800) == 800
    assert predicted_wait_ms(queued_ahead=15, free_slots=0, total_slots=8, mean_service_ms=800) == 1600
    assert predicted_wait_ms(queued_ahead=3, free_slots=0, total_slots=0, mean_service_ms=800) == float("inf")


def test_sticky_split_proportion_and_stickiness():
    split = TrafficSplit("chat", [Variant("model-a", 80), Variant("model-b", 20)], rand=random.Random(1).random)
    by_user = {f"user-{i}": split.choose(f"user-{i}") for i in range(4000)}
    share_b = sum(v == "model-b" for v in by_user.values()) / len(by_user)
    assert 0.17 < share_b < 0.23
    assert all(split.choose(user) == model for user, model in list(by_user.items())[:200])
    anonymous = collections.Counter(split.choose(None) for _ in range(4000))
    assert 0.17 < anonymous["model-b"] / 4000 < 0.23


def test_split_counters_and_validation():
    split = TrafficSplit("chat", [Variant("a", 1), Variant("b", 0)])
    assert {split.choose(f"u{i}") for i in range(100)} == {"a"}
    split.record("a", ttft_ms=100, output_tokens=10)
    split.record("a", error=True)
    assert (split.stats["a"].requests, split.stats["a"].errors, split.stats["a"].mean_ttft_ms) == (2, 1, 100)
    with pytest.raises(ValueError):
        TrafficSplit("x", [Variant("a", 0)])
