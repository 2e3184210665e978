"""Placement policies with FAKE engine-group views and an injected clock: residency, capacity in
sequences, spill, health, KV headroom, bounded affinity, the registry, the spill simulation and
gate, sticky splits. No Ray needed."""

import collections
import random

import pytest

from serve_app.errors import ConfigError
from serve_app.policy.classify import DataClass
from serve_app.policy.filters import Filter
from serve_app.policy.lru import BoundedLru
from serve_app.policy.placement import GroupView, PlacementPipeline, RequestView
from serve_app.policy.scorers import AffinityScorer
from serve_app.policy.spill import SiteSimulation, SpillGate, SpillParams
from serve_app.policy.splits import TrafficSplit, Variant


def fake_groups(onprem_in_flight=0, cloud_in_flight=0, capacity=4, model="m"):
    """FAKE groups: two on-prem (trusted up to restricted), one cloud (public/internal)."""
    return [
        GroupView("onprem-a", model, "onprem", 0, DataClass.restricted, capacity, min(onprem_in_flight, capacity)),
        GroupView("onprem-b", model, "onprem", 0, DataClass.restricted, capacity, max(0, onprem_in_flight - capacity)),
        GroupView("cloud-a", model, "cloud", 1, DataClass.internal, capacity, cloud_in_flight),
    ]


@pytest.fixture
def pipeline():
    return PlacementPipeline.from_names()


def test_low_load_stays_on_the_preferred_site(pipeline):
    for i in range(8):
        decision = pipeline.place(RequestView(f"r{i}", "m", allow_spill=True), fake_groups(onprem_in_flight=i))
        assert decision.group.site == "onprem" and decision.reason == "preferred"


def test_full_onprem_without_spill_means_wait_not_cloud(pipeline):
    decision = pipeline.place(RequestView("r", "m", allow_spill=False), fake_groups(onprem_in_flight=8))
    assert decision.group is None and decision.reason == "no group passed spill"


def test_full_onprem_with_spill_goes_to_cloud(pipeline):
    decision = pipeline.place(RequestView("r", "m", allow_spill=True), fake_groups(onprem_in_flight=8))
    assert decision.group.site == "cloud" and decision.reason == "spill"


@pytest.mark.parametrize("data_class", [DataClass.confidential, DataClass.restricted])
def test_residency_never_spills_sensitive_data(pipeline, data_class):
    for onprem_load in range(0, 9):
        decision = pipeline.place(RequestView("r", "m", data_class=data_class, allow_spill=True),
                                  fake_groups(onprem_in_flight=onprem_load))
        assert decision.group is None or decision.group.site == "onprem"
    full = pipeline.place(RequestView("r", "m", data_class=data_class, allow_spill=True), fake_groups(onprem_in_flight=8))
    assert full.group is None  # waits rather than leaving on-prem


def test_a_request_needs_room_for_all_its_sequences(pipeline):
    groups = [GroupView("onprem", "m", "onprem", 0, DataClass.restricted, 8, 6),
              GroupView("cloud", "m", "cloud", 1, DataClass.internal, 8, 0)]
    assert pipeline.place(RequestView("r", "m", sequences=2), groups).group.group_id == "onprem"
    assert pipeline.place(RequestView("r", "m", sequences=3), groups).group is None
    assert pipeline.place(RequestView("r", "m", sequences=3, allow_spill=True), groups).group.group_id == "cloud"


def test_unhealthy_and_kv_full_groups_are_skipped(pipeline):
    groups = fake_groups()
    groups[0] = GroupView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, 0, healthy=False)
    groups[1] = GroupView("onprem-b", "m", "onprem", 0, DataClass.restricted, 4, 0, kv_cache_usage=0.99)
    assert pipeline.place(RequestView("r", "m", allow_spill=True), groups).group.group_id == "cloud-a"


def test_capacity_is_never_exceeded(pipeline):
    groups = fake_groups(capacity=2)
    in_flight = collections.Counter()
    placed = 0
    for i in range(20):
        view = [GroupView(g.group_id, g.model, g.site, g.site_rank, g.trusted_up_to, g.capacity, in_flight[g.group_id])
                for g in groups]
        decision = pipeline.place(RequestView(f"r{i}", "m", allow_spill=True), view)
        if decision.group:
            in_flight[decision.group.group_id] += 1
            placed += 1
    assert placed == 6 and all(v <= 2 for v in in_flight.values())


def two_onprem(a_in_flight, b_in_flight):
    return [GroupView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, a_in_flight),
            GroupView("onprem-b", "m", "onprem", 0, DataClass.restricted, 4, b_in_flight)]


def test_affinity_keeps_a_session_on_its_group(pipeline):
    first = pipeline.place(RequestView("r1", "m", affinity_key="sess-1"), two_onprem(3, 0))
    assert first.group.group_id == "onprem-b"  # least loaded at the time
    assert pipeline.place(RequestView("r2", "m"), two_onprem(0, 2)).group.group_id == "onprem-a"
    assert pipeline.place(RequestView("r3", "m", affinity_key="sess-1"), two_onprem(0, 2)).group.group_id == "onprem-b"
    # Affinity never overrides a full group.
    assert pipeline.place(RequestView("r4", "m", affinity_key="sess-1"), two_onprem(0, 4)).group.group_id == "onprem-a"


def test_a_lone_candidate_is_chosen_without_scoring_yet_a_custom_picker_still_decides(pipeline):
    """The pipeline skips the scorers when one group is left and the picker is the default
    ``max_score`` (the highest score of one); the session is still remembered, and a picker of
    another kind is still asked, even about one group."""
    from serve_app.policy.placement import Picker

    one = [GroupView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, 1)]
    decision = pipeline.place(RequestView("r1", "m", affinity_key="sess-9"), one)
    assert decision.group.group_id == "onprem-a" and decision.reason == "preferred"
    assert pipeline.scorer("affinity").last.get("sess-9") == "onprem-a"

    class NothingBelowHalfFree(Picker):  # (unregistered: built directly, as a plugin would be)
        name = "nothing_below_half_free_test"

        def pick(self, groups, scores):
            return next((g for g in groups if g.free * 2 >= g.capacity), None)

    choosy = PlacementPipeline(pipeline.filters, pipeline.scorers, NothingBelowHalfFree())
    busy = [GroupView("onprem-a", "m", "onprem", 0, DataClass.restricted, 4, 3)]
    assert choosy.place(RequestView("r2", "m"), busy).group is None
    assert choosy.place(RequestView("r3", "m"), one).group.group_id == "onprem-a"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_affinity_memory_is_bounded_in_size_and_age():
    clock = FakeClock()
    scorer = AffinityScorer(AffinityScorer.Params(max_keys=100, ttl_s=60))
    scorer.last = BoundedLru(100, 60, clock)
    for i in range(10_000):  # one entry per distinct user used to stay forever
        scorer.remember(f"user-{i}", "onprem-a")
    assert len(scorer.last) == 100
    assert scorer.last.get("user-0") is None and scorer.last.get("user-9999") == "onprem-a"
    clock.now += 61
    assert scorer.last.get("user-9999") is None  # past its TTL
    scorer.remember("s", "g1")
    scorer.forget_group("g1")
    assert scorer.last.get("s") is None


def test_unknown_policy_names_and_bad_parameters_fail_at_startup():
    with pytest.raises(ConfigError, match="Unknown filter policy 'geo'; known: free_slot, health, residency, spill"):
        PlacementPipeline.from_names(filters=["residency", "geo"])
    with pytest.raises(ConfigError, match="invalid parameters for filter policy 'free_slot'"):
        PlacementPipeline.from_names(params={"free_slot": {"max_kv_cache_usage": 3}})
    with pytest.raises(ConfigError, match="invalid parameters for scorer policy 'affinity'"):
        PlacementPipeline.from_names(params={"affinity": {"max_keys": 0}})
    assert Filter.registered() == ["free_slot", "health", "residency", "spill"]


def test_site_simulation_orders_starts_by_when_sequences_free():
    sim = SiteSimulation(10.0, [10.0, 12.0, 15.0])  # one free now, two busy until 12 s and 15 s
    assert sim.start(1) == 10.0
    assert sim.take(1, 4_000) == 10.0  # runs 10 -> 14 s
    assert sim.start(1) == 12.0
    assert sim.start(2) == 14.0  # needs two: the second frees at 14 s
    assert sim.take(2, 1_000) == 14.0
    assert sim.start(4) == float("inf")  # more than the site runs at once


def test_spill_gate_tightens_the_budget_while_spilling_and_relaxes_with_hysteresis():
    clock = FakeClock()
    gate = SpillGate(SpillParams(spill_after_ms=1000, close_ratio=0.5, min_hold_ms=3000, margin_ms=50), clock=clock)
    assert gate.budget_ms() == 950
    assert gate.update(spilled_on_prediction=False, pressure=True) is False  # pressure alone opens nothing
    assert gate.update(spilled_on_prediction=True, pressure=True) is True
    assert gate.budget_ms() == 450  # spill sooner while the burst lasts
    clock.now += 1.0
    assert gate.update(False, False) is True  # quiet, but not for min_hold_ms yet
    clock.now += 2.0
    assert gate.update(False, True) is True  # pressure again: the hold starts over
    clock.now += 1.0
    assert gate.update(False, False) is True
    clock.now += 3.0
    assert gate.update(False, False) is False
    assert gate.budget_ms() == 950


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
