"""The router's per-model scheduler with FAKE engine groups and an injected clock (no Ray):
continuous batching, bounds, residency under saturation, spill with hysteresis, failover exclusion."""

import asyncio

import pytest

from serve_app.errors import RateLimited
from serve_app.policy.admission import AdmissionParams
from serve_app.policy.classify import DataClass
from serve_app.policy.pipeline import PlacementPipeline, RequestView, SpillParams
from serve_app.router.scheduler import SPILL_REASON_NONE, SPILL_REASON_WAIT, EngineGroup, ModelScheduler, QueueTimeout


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make_scheduler(clock, onprem_slots=2, cloud_slots=2, max_len=100, max_wait_ms=60_000, spill_after_ms=1_000):
    groups = [
        EngineGroup("m@onprem", "m", "onprem", 0, DataClass.restricted, onprem_slots),
        EngineGroup("m@cloud", "m", "cloud", 1, DataClass.internal, cloud_slots),
    ]
    return ModelScheduler(
        "m", groups, PlacementPipeline.from_names(),
        AdmissionParams(max_queue_len=max_len, max_queue_wait_ms=max_wait_ms),
        SpillParams(spill_after_ms=spill_after_ms, close_ratio=0.5, min_hold_ms=1_000),
        clock=clock,
    )


def req(i, data_class=DataClass.public):
    return RequestView(f"r{i}", "m", data_class)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_low_load_is_served_on_prem_immediately():
    async def main():
        sched = make_scheduler(FakeClock())
        slot = await sched.acquire(req(0))
        assert (slot.group.site, slot.spill_reason, slot.queue_ms) == ("onprem", SPILL_REASON_NONE, 0.0)
        sched.release(slot)
        assert sched.in_flight["m@onprem"] == 0

    asyncio.run(main())


def test_slot_frees_and_the_next_request_goes_at_once_never_over_slots():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem_slots=2, spill_after_ms=10**9)  # never spill
        tasks = [asyncio.create_task(sched.acquire(req(i))) for i in range(5)]
        await settle()
        done = [t for t in tasks if t.done()]
        assert len(done) == 2 and sched.in_flight["m@onprem"] == 2 and len(sched.queue) == 3
        clock.now += 0.5
        sched.release(done[0].result())
        await settle()
        assert sum(t.done() for t in tasks) == 3 and sched.in_flight["m@onprem"] == 2
        third = next(t for t in tasks if t.done() and t not in done)
        assert third.result().queue_ms == 500.0
        for t in tasks:
            if not t.done():
                t.cancel()
        await settle()
        assert len(sched.queue) == 0

    asyncio.run(main())


def test_saturation_spills_public_but_keeps_confidential_on_prem():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem_slots=2, cloud_slots=4, spill_after_ms=1_000)
        sched.mean_service_ms = 2_000  # each request holds a slot ~2 s: a queue of 1 already breaks the budget
        first = [await sched.acquire(req(i)) for i in range(2)]
        assert {s.group.site for s in first} == {"onprem"}
        confidential = asyncio.create_task(sched.acquire(req(10, DataClass.confidential)))
        public = asyncio.create_task(sched.acquire(req(11)))
        await settle()
        assert public.done() and public.result().group.site == "cloud"
        assert public.result().spill_reason == SPILL_REASON_WAIT
        assert not confidential.done()  # waits for on-prem, never spills
        sched.release(first[0])
        await settle()
        assert confidential.result().group.site == "onprem"

    asyncio.run(main())


def test_spill_gate_closes_with_hysteresis_after_load_drops():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem_slots=1, cloud_slots=4, spill_after_ms=1_000)
        sched.mean_service_ms = 3_000
        held = await sched.acquire(req(0))
        spilled = await sched.acquire(req(1))
        assert spilled.group.site == "cloud" and sched.gate.is_open
        sched.release(held)
        sched.mean_service_ms = 100  # load is gone
        again = await sched.acquire(req(2))
        assert again.group.site == "onprem"
        assert sched.gate.is_open  # still open: has not stayed low for min_hold_ms
        sched.release(again)
        clock.now += 2.0
        sched.pump()
        later = await sched.acquire(req(3))
        assert later.group.site == "onprem" and later.spill_reason == SPILL_REASON_NONE

    asyncio.run(main())


def test_queue_bounds_give_429_and_503_with_retry_after():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem_slots=1, cloud_slots=0, max_len=1, max_wait_ms=50)
        await sched.acquire(req(0))
        waiting = asyncio.create_task(sched.acquire(req(1)))
        await settle()
        with pytest.raises(RateLimited) as full:
            await sched.acquire(req(2))
        assert full.value.status == 429 and full.value.retry_after_s >= 1
        with pytest.raises(QueueTimeout) as timeout:
            await waiting
        assert timeout.value.status == 503 and timeout.value.retry_after_s >= 1
        assert len(sched.queue) == 0

    asyncio.run(main())


def test_failed_group_is_held_out_and_retry_goes_elsewhere_within_residency():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock)
        slot = await sched.acquire(req(0))
        sched.release(slot, failed=True)
        retry = await sched.acquire(req(0), exclude=frozenset({"m@onprem"}))
        assert retry.group.site == "cloud"
        fresh = await sched.acquire(req(1))
        assert fresh.group.site == "cloud"  # on-prem is cooling down after the failure
        confidential = req(2, DataClass.confidential)
        assert not sched.has_candidate(confidential, frozenset({"m@onprem"}))
        clock.now += 10
        assert (await sched.acquire(confidential)).group.site == "onprem"

    asyncio.run(main())


def test_cancelled_waiter_leaves_no_trace():
    async def main():
        sched = make_scheduler(FakeClock(), onprem_slots=1, cloud_slots=0)
        held = await sched.acquire(req(0))
        waiter = asyncio.create_task(sched.acquire(req(1)))
        await settle()
        waiter.cancel()
        await settle()
        sched.release(held)
        assert sched.in_flight["m@onprem"] == 0 and len(sched.queue) == 0

    asyncio.run(main())


def test_waiter_is_dispatched_when_a_failed_group_cools_down_without_other_traffic():
    async def main():
        sched = ModelScheduler(
            "m", [EngineGroup("m@onprem", "m", "onprem", 0, DataClass.restricted, 2)], PlacementPipeline.from_names(),
            AdmissionParams(max_queue_wait_ms=5_000), SpillParams(), unhealthy_cooldown_s=0.05,
        )
        slot = await sched.acquire(req(0))
        sched.release(slot, failed=True)
        retry = await asyncio.wait_for(sched.acquire(req(1)), timeout=2)  # real clock: waits out the cooldown
        assert retry.group.site == "onprem"

    asyncio.run(main())


def test_other_routers_load_counts_against_free_slots():
    async def main():
        sched = make_scheduler(FakeClock(), onprem_slots=4, cloud_slots=4)
        sched.mean_service_ms = 4_000  # a queue of one predicts 2 s > the 1 s budget
        mine = await sched.acquire(req(0))
        sched.observe_engine_load("m@onprem", 4)  # the engine holds 4: ours plus 3 from another router
        assert sched.others_in_flight["m@onprem"] == 3
        assert sched.views()[0].free_slots == 0
        spilled = await sched.acquire(req(1))
        assert spilled.group.site == "cloud"  # on-prem is full fleet-wide, not just for this router
        waiting = asyncio.create_task(sched.acquire(req(2, DataClass.confidential)))
        await settle()
        assert not waiting.done()
        sched.observe_engine_load("m@onprem", 2)  # the other router's requests finished
        await settle()
        assert waiting.done() and waiting.result().group.site == "onprem"
        sched.release(mine)

    asyncio.run(main())


def test_under_spill_a_freed_onprem_slot_goes_to_the_request_that_cannot_spill():
    async def main():
        sched = make_scheduler(FakeClock(), onprem_slots=1, cloud_slots=1, spill_after_ms=1_000)
        sched.mean_service_ms = 5_000
        onprem = await sched.acquire(req(0))
        cloud = await sched.acquire(req(1))  # gate opened: spilled
        assert (onprem.group.site, cloud.group.site) == ("onprem", "cloud")
        public = asyncio.create_task(sched.acquire(req(2)))  # older
        await settle()
        confidential = asyncio.create_task(sched.acquire(req(3, DataClass.confidential)))
        await settle()
        sched.release(onprem)
        await settle()
        assert confidential.done() and confidential.result().group.site == "onprem"
        assert not public.done()  # it can use the cloud, and gets the next cloud slot
        sched.release(cloud)
        await settle()
        assert public.done() and public.result().group.site == "cloud"

    asyncio.run(main())


def test_without_spill_pressure_order_is_plain_priority_then_fifo():
    async def main():
        sched = make_scheduler(FakeClock(), onprem_slots=1, cloud_slots=1, spill_after_ms=10**9)
        held = await sched.acquire(req(0))
        public = asyncio.create_task(sched.acquire(req(1)))
        await settle()
        confidential = asyncio.create_task(sched.acquire(req(2, DataClass.confidential)))
        await settle()
        sched.release(held)
        await settle()
        assert public.done() and not confidential.done()
        confidential.cancel()

    asyncio.run(main())


def test_kv_cache_full_group_takes_nothing_until_it_drains():
    async def main():
        sched = make_scheduler(FakeClock(), onprem_slots=4, cloud_slots=0, spill_after_ms=10**9)
        sched.observe_engine_load("m@onprem", 0, kv_cache_usage=0.99)
        waiting = asyncio.create_task(sched.acquire(req(0)))
        await settle()
        assert not waiting.done()  # free slots, but no KV-cache headroom
        sched.observe_engine_load("m@onprem", 0, kv_cache_usage=0.40)
        await settle()
        assert waiting.done() and waiting.result().group.site == "onprem"

    asyncio.run(main())


def test_request_waiting_for_a_failed_group_goes_when_its_cooldown_ends():
    """Only one group, it failed: a new request waits out the cooldown, then is placed without any
    other event (the re-pump timer fires after the cooldown, never a hair before it)."""
    import time

    async def main():
        groups = [EngineGroup("m@onprem", "m", "onprem", 0, DataClass.restricted, 2)]
        sched = ModelScheduler("m", groups, PlacementPipeline.from_names(),
                               AdmissionParams(max_queue_len=10, max_queue_wait_ms=5_000),
                               SpillParams(spill_after_ms=1_000, close_ratio=0.5, min_hold_ms=1_000),
                               unhealthy_cooldown_s=0.2)
        results = []
        for _ in range(5):
            sched.release(await sched.acquire(req(0)), failed=True)
            started = time.monotonic()
            slot = await asyncio.wait_for(sched.acquire(req(1)), timeout=2)
            results.append(time.monotonic() - started)
            sched.release(slot)
        return results

    waits = asyncio.run(main())
    assert all(0.15 <= w < 1.0 for w in waits), waits
