"""The router's per-model scheduler with FAKE engine groups and an injected clock (no Ray):
leases on sequences, continuous batching, bounds, residency under saturation, the spill decision
on a synthetic burst, the deadline backstop, budget-miss accounting, capacity from health."""

import asyncio

import pytest

from serve_app.errors import RateLimited
from serve_app.planner.virtual_time import run_virtual
from serve_app.policy.admission import AdmissionParams
from serve_app.policy.classify import DataClass
from serve_app.policy.placement import PlacementPipeline, RequestView
from serve_app.policy.spill import SpillParams
from serve_app.router.groups import EngineGroup
from serve_app.router.scheduler import (
    SPILL_REASON_FAILOVER,
    SPILL_REASON_NONE,
    SPILL_REASON_QUEUE_FULL,
    SPILL_REASON_WAIT,
    ModelScheduler,
    NoAllowedSite,
    NoHealthyEngine,
    QueueTimeout,
)
from serve_app.router.spill_scan import SCAN_BURST_S, SCAN_GAP_S, SCAN_ITEM_ALLOWANCE_S


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_scheduler(clock, onprem=2, cloud=2, max_len=100, max_wait_ms=60_000, spill_after_ms=1_000, itl_ms=10.0,
                   ttft_ms=50.0, margin_ms=0.0, context_tokens=None):
    groups = [
        EngineGroup("m@onprem", "m", "onprem", 0, DataClass.restricted, 1, onprem),
        EngineGroup("m@cloud", "m", "cloud", 1, DataClass.internal, 1, cloud),
    ]
    return ModelScheduler(
        "m", groups, PlacementPipeline.from_names(),
        AdmissionParams(max_queue_len=max_len, max_queue_wait_ms=max_wait_ms),
        SpillParams(spill_after_ms=spill_after_ms, close_ratio=0.5, min_hold_ms=1_000, margin_ms=margin_ms,
                    prior_itl_ms=itl_ms, prior_ttft_ms=ttft_ms, context_tokens=context_tokens),
        clock=clock,
    )


def req(i, data_class=DataClass.public, sequences=1):
    return RequestView(f"r{i}", "m", data_class, sequences=sequences)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_low_load_is_served_on_prem_and_a_lease_releases_exactly_once():
    async def main():
        sched = make_scheduler(FakeClock())
        lease = await sched.acquire(req(0), max_tokens=16)
        assert (lease.group.site, lease.spill_reason, lease.queue_ms) == ("onprem", SPILL_REASON_NONE, 0.0)
        assert sched.in_flight["m@onprem"] == 1
        assert lease.release() is True
        assert lease.release() is False  # a second release gives nothing back twice
        assert sched.in_flight["m@onprem"] == 0

    asyncio.run(main())


def test_a_request_occupies_n_times_prompts_sequences():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=4, cloud=0, spill_after_ms=10**9)
        big = await sched.acquire(req(0, sequences=3))
        assert sched.in_flight["m@onprem"] == 3
        waiting = asyncio.create_task(sched.acquire(req(1, sequences=2)))
        await settle()
        assert not waiting.done()  # one sequence is free, the request needs two
        single = await sched.acquire(req(2))  # a one-sequence request fits meanwhile
        assert sched.in_flight["m@onprem"] == 4
        big.release()
        await settle()
        assert waiting.done() and sched.in_flight["m@onprem"] == 3
        waiting.result().release()
        single.release()
        assert sched.in_flight["m@onprem"] == 0

    asyncio.run(main())


def test_freed_sequences_go_to_the_next_request_at_once_never_over_capacity():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=2, spill_after_ms=10**9)  # never spill
        tasks = [asyncio.create_task(sched.acquire(req(i))) for i in range(5)]
        await settle()
        done = [t for t in tasks if t.done()]
        assert len(done) == 2 and sched.in_flight["m@onprem"] == 2 and len(sched.queue) == 3
        clock.now += 0.5
        done[0].result().release()
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


def test_synthetic_burst_spills_at_once_what_would_miss_its_budget_and_keeps_the_rest():
    """On-prem has 4 sequences, each busy with 1,000 more tokens at 10 ms per token (10 s): a new
    request would start far past its 1 s budget, so public requests spill the moment they arrive,
    while confidential ones wait on-prem. No mean of past requests is involved: this scheduler has
    never finished a request."""

    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=4, cloud=8, spill_after_ms=1_000, itl_ms=10.0)
        running = [await sched.acquire(req(i), max_tokens=1_000) for i in range(4)]
        for lease in running:
            lease.streaming, lease.first_token_at = True, clock.now
        burst = [asyncio.create_task(sched.acquire(req(10 + i), max_tokens=64)) for i in range(6)]
        confidential = asyncio.create_task(sched.acquire(req(99, DataClass.confidential), max_tokens=64))
        await settle()
        assert all(t.done() for t in burst) and not confidential.done()
        assert {t.result().group.site for t in burst} == {"cloud"}
        assert {t.result().spill_reason for t in burst} == {SPILL_REASON_WAIT}
        assert all(t.result().queue_ms == 0.0 for t in burst)  # spilled on arrival, not after waiting
        assert sched.spillable == 10 and sched.budget_misses == 0  # the 4 running ones were spillable too
        confidential.cancel()

    asyncio.run(main())


def test_a_request_that_will_get_on_prem_within_budget_waits_for_it():
    """The running requests are nearly done (5 tokens left at 10 ms): waiting ~50 ms beats the
    cloud, so the request queues on-prem even though the cloud is idle."""

    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=1, cloud=8, spill_after_ms=1_000, itl_ms=10.0)
        running = await sched.acquire(req(0), max_tokens=100)
        running.streaming, running.first_token_at, running.tokens_out = True, clock.now, 95
        waiting = asyncio.create_task(sched.acquire(req(1), max_tokens=32))
        await settle()
        assert not waiting.done() and sched.in_flight["m@cloud"] == 0
        clock.now += 0.05
        running.release()
        await settle()
        assert waiting.result().group.site == "onprem" and waiting.result().queue_ms == pytest.approx(50.0)

    asyncio.run(main())


def test_a_queued_request_spills_by_its_deadline_when_the_prediction_was_too_hopeful():
    """The engine said 5 tokens were left, but the request keeps running: at the deadline the
    timer spills the waiting request, having waited less than its budget (no budget miss)."""

    async def main(loop):  # in virtual time (the planner's loop): the timer fires when it is due
        sched = make_scheduler(loop.time, onprem=1, cloud=4, spill_after_ms=150, itl_ms=1.0, margin_ms=30)
        running = await sched.acquire(req(0), max_tokens=10)
        running.streaming, running.first_token_at, running.tokens_out = True, loop.time(), 5
        lease = await asyncio.wait_for(sched.acquire(req(1), max_tokens=10), timeout=2)
        assert lease.group.site == "cloud" and lease.spill_reason == SPILL_REASON_WAIT
        assert 90 <= lease.queue_ms < 150  # spilled by the timer, before the 150 ms budget ran out
        assert sched.budget_misses == 0 and not lease.budget_miss
        running.release()
        lease.release()

    run_virtual(main, start=100.0)


def test_a_storm_of_releases_and_load_reports_rescans_the_queue_once_per_gap_and_deadlines_still_hold():
    """On a saturated site every release and load report pumps; the spill scan (the whole queue's
    predicted starts) runs at most once per SCAN_GAP_S after one, the rest deferred to a timer. An
    arrival is judged at once, and a request whose prediction was too hopeful still spills by its
    deadline, without a budget miss."""

    async def main(loop):
        sched = make_scheduler(loop.time, onprem=2, cloud=4, spill_after_ms=150, itl_ms=1.0, margin_ms=30)
        scans = []
        scan = sched._spill_scan
        sched._spill_scan = lambda now, views: scans.append(now) or scan(now, views)
        running = [await sched.acquire(req(i), max_tokens=10) for i in range(2)]
        for lease in running:  # 5 tokens left at 1 ms each, as far as anyone knows (they keep running)
            lease.streaming, lease.first_token_at, lease.tokens_out = True, loop.time(), 5
        waiting = asyncio.create_task(sched.acquire(req(5), max_tokens=10))
        await asyncio.sleep(0)
        assert not waiting.done() and len(scans) == 1  # judged on arrival: on-prem within budget
        for _ in range(50):  # a storm at one instant: other routers' load reports
            sched.observe_engine_load("m@onprem", 2)
        assert len(scans) == 1  # deferred ...
        await asyncio.sleep(SCAN_GAP_S)
        assert len(scans) == 2 and scans[1] - scans[0] == pytest.approx(SCAN_GAP_S)  # ... to one scan, a gap later
        lease = await asyncio.wait_for(waiting, timeout=2)
        assert lease.group.site == "cloud" and lease.spill_reason == SPILL_REASON_WAIT
        assert 90 <= lease.queue_ms < 150 and not lease.budget_miss and sched.budget_misses == 0
        assert len(scans) <= 4  # the deferred one, the deadline's: no scan per report
        for held in (*running, lease):
            held.release()

    run_virtual(main, start=100.0)


def test_on_a_big_saturated_site_arrivals_share_a_bounded_scan_allowance_and_still_spill_within_budget():
    """600 on-prem sequences busy for seconds and 400 arrivals at one instant: each arrival would
    otherwise rescan 600 leases and the whole queue (quadratic, ~1 ms of router CPU each). Scans
    draw on an allowance (SCAN_ITEM_ALLOWANCE_S per item, bursts of SCAN_BURST_S): the first
    arrivals are judged at once, the rest by scans spaced by their size; every arrival still
    spills long before its budget, and none is a budget miss."""

    async def main(loop):
        sched = make_scheduler(loop.time, onprem=600, cloud=1_000, max_len=1_000, spill_after_ms=500, itl_ms=10.0,
                               margin_ms=50)
        scans = []
        scan = sched._spill_scan
        sched._spill_scan = lambda now, views: scans.append((now, len(sched.queue))) or scan(now, views)
        running = [await sched.acquire(req(i), max_tokens=1_000) for i in range(600)]
        for lease in running:  # 1,000 tokens left at 10 ms each: 10 s, far past the budget
            lease.streaming, lease.first_token_at = True, loop.time()
        started = loop.time()
        burst = [loop.create_task(sched.acquire(req(1_000 + i), max_tokens=64)) for i in range(400)]
        await asyncio.sleep(0)
        at_once = [at for at, _ in scans if at == started]
        assert 1 <= len(at_once) < 10  # the allowance's burst, not one scan per arrival
        leases = await asyncio.wait_for(asyncio.gather(*burst), timeout=5)
        assert {lease.group.site for lease in leases} == {"cloud"}
        assert {lease.spill_reason for lease in leases} == {SPILL_REASON_WAIT}
        assert max(lease.queue_ms for lease in leases) < 200  # far inside the 500 ms budget
        assert sched.budget_misses == 0 and not any(lease.budget_miss for lease in leases)
        # The scans' items (leases + queued) at SCAN_ITEM_ALLOWANCE_S each fit the time they took
        # plus one burst: at most about a tenth of the loop went to predictions.
        items = sum(600 + queued for _, queued in scans)
        assert items * SCAN_ITEM_ALLOWANCE_S <= (scans[-1][0] - started) + SCAN_BURST_S + 0.01
        assert len(scans) < 60
        for held in (*running, *leases):
            held.release()

    run_virtual(main, start=100.0)


def test_a_request_granted_on_arrival_skips_the_queue_and_try_acquire_says_when_it_must_wait():
    """``try_acquire`` is ``acquire``'s synchronous part (the planner calls it; ``acquire`` starts
    with it): a lease at once while nobody is queued and on-prem has room, None when the request
    must wait its turn, and the same refusals as ``acquire``."""

    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=1, cloud=1)
        first = sched.try_acquire(req(0), max_tokens=16)
        assert (first.group.site, first.spill_reason, first.queue_ms) == ("onprem", SPILL_REASON_NONE, 0.0)
        assert sched.in_flight["m@onprem"] == 1 and len(sched.queue) == 0
        assert sched.try_acquire(req(1), max_tokens=16) is None  # on-prem is full: it must queue
        waiting = asyncio.create_task(sched.acquire(req(2), max_tokens=16))
        await settle()
        first.release()  # the freed sequence goes to the queued request, not to a newcomer
        await settle()
        assert waiting.done() and waiting.result().group.site == "onprem"
        with pytest.raises(NoAllowedSite):  # confidential, and on-prem excluded (its key's budget policy)
            sched.try_acquire(req(3, DataClass.confidential), exclude=frozenset({"m@onprem"}))
        sched.set_capacity("m@onprem", 0)
        sched.set_capacity("m@cloud", 0)
        with pytest.raises(NoHealthyEngine):
            sched.try_acquire(req(4))
        waiting.result().release()

    asyncio.run(main())


def test_only_waiting_past_the_budget_while_room_elsewhere_existed_is_a_budget_miss():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=1, cloud=1, spill_after_ms=1_000, itl_ms=1.0)
        onprem = await sched.acquire(req(0), max_tokens=10)  # done in ~60 ms, as far as anyone knows
        cloud = await sched.acquire(req(1), retry=True)  # a retry takes the cloud
        waiting = asyncio.create_task(sched.acquire(req(2), max_tokens=10))
        await settle()
        assert not waiting.done()  # on-prem soon, the cloud full: it waits
        clock.now += 2.0
        cloud.release()  # room elsewhere appears only now, past the budget: no miss
        await settle()
        first = waiting.result()
        assert first.group.site == "cloud" and not first.budget_miss and sched.budget_misses == 0

        second = asyncio.create_task(sched.acquire(req(3), max_tokens=10))  # the cloud is full again
        await settle()
        first.release()  # room elsewhere from now on
        await settle()
        assert not second.done()  # on-prem predicted within budget: it waits, the cloud idle
        clock.now += 2.0  # the deadline passed and nothing ran (a stalled loop: no timer, no event)
        sched.pump()
        await settle()
        lease = second.result()
        assert lease.group.site == "cloud" and lease.budget_miss and sched.budget_misses == 1
        onprem.release()
        lease.release()

    asyncio.run(main())


def test_saturation_spills_public_but_keeps_confidential_on_prem():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=2, cloud=4, spill_after_ms=1_000, itl_ms=20.0)
        first = [await sched.acquire(req(i), max_tokens=500) for i in range(2)]  # 10 s each on-prem
        assert {lease.group.site for lease in first} == {"onprem"}
        confidential = asyncio.create_task(sched.acquire(req(10, DataClass.confidential)))
        public = asyncio.create_task(sched.acquire(req(11)))
        await settle()
        assert public.done() and public.result().group.site == "cloud"
        assert not confidential.done()  # waits for on-prem, never spills
        first[0].release()
        await settle()
        assert confidential.result().group.site == "onprem"

    asyncio.run(main())


def test_under_spill_pressure_freed_on_prem_goes_to_the_request_that_cannot_spill():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=1, spill_after_ms=10**9)
        onprem = await sched.acquire(req(0))
        cloud = await sched.acquire(req(1), retry=True)  # a retry may go anywhere: fills the cloud
        assert (onprem.group.site, cloud.group.site) == ("onprem", "cloud")
        cloud.release()
        held_cloud = await sched.acquire(req(5), retry=True)
        public = asyncio.create_task(sched.acquire(req(2)))  # older
        await settle()
        confidential = asyncio.create_task(sched.acquire(req(3, DataClass.confidential)))
        await settle()
        held_cloud.release()  # room elsewhere again: the public request could go there
        await settle()
        onprem.release()
        await settle()
        assert confidential.done() and confidential.result().group.site == "onprem"
        assert not public.done()  # the older request that may spill still waits: it did not take the on-prem sequence
        public.cancel()

    asyncio.run(main())


def test_with_the_cloud_full_too_a_freed_on_prem_sequence_goes_to_the_request_that_cannot_leave():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=1, spill_after_ms=100)
        onprem = await sched.acquire(req(0))
        cloud = await sched.acquire(req(1), retry=True)  # a retry may go anywhere: fills the cloud
        public = asyncio.create_task(sched.acquire(req(2)))  # older, and nowhere has room
        await settle()
        confidential = asyncio.create_task(sched.acquire(req(3, DataClass.confidential)))
        await settle()
        onprem.release()  # the cloud is still full
        await settle()
        assert confidential.done() and confidential.result().group.site == "onprem"
        assert not public.done()  # it may also take the cloud's next free sequence; the other may not
        cloud.release()
        await settle()
        assert public.done() and public.result().group.site == "cloud"

    asyncio.run(main())


def test_with_no_healthy_group_elsewhere_a_freed_on_prem_sequence_goes_in_queue_order():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=1, spill_after_ms=10**9)
        sched.set_capacity("m@cloud", 0)  # the cloud's replicas are down: everyone waits for on-prem alike
        onprem = await sched.acquire(req(0))
        public = asyncio.create_task(sched.acquire(req(2)))  # older
        await settle()
        confidential = asyncio.create_task(sched.acquire(req(3, DataClass.confidential)))
        await settle()
        onprem.release()
        await settle()
        assert public.done() and public.result().group.site == "onprem"
        assert not confidential.done()
        confidential.cancel()

    asyncio.run(main())


def test_queue_bounds_give_429_and_503_with_retry_after():
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=1, cloud=0, max_len=1, max_wait_ms=50)
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


def test_a_full_queue_spills_what_may_leave_and_refuses_only_what_may_not_or_finds_no_room():
    async def main():
        clock = FakeClock()
        # A long budget: no queued request is predicted to miss it, so only the full queue can spill.
        sched = make_scheduler(clock, onprem=1, cloud=1, max_len=1, spill_after_ms=60_000)
        await sched.acquire(req(0))  # on-prem's one sequence
        waiting = asyncio.create_task(sched.acquire(req(1)))
        await settle()
        assert len(sched.queue) == 1 and not waiting.done()
        confidential = req(2, DataClass.restricted)
        with pytest.raises(RateLimited):  # it may not leave on-prem: the full queue refuses it
            await sched.acquire(confidential)
        spilled = await sched.acquire(req(3))  # it may: the cloud's free sequence takes it at once
        assert spilled.group.site == "cloud" and spilled.spill_reason == SPILL_REASON_QUEUE_FULL
        assert spilled.queue_ms == 0 and sched.spilled[SPILL_REASON_QUEUE_FULL] == 1
        with pytest.raises(RateLimited) as full:  # the cloud is full too: 429
            await sched.acquire(req(4))
        assert full.value.retry_after_s >= 1
        assert len(sched.queue) == 1 and not waiting.done()  # the queued request kept its place
        spilled.release()
        assert sched.in_flight["m@cloud"] == 0
        waiting.cancel()

    asyncio.run(main())


def test_a_request_queued_again_waits_no_longer_in_all_than_the_queue_allows():
    """A request an engine turned away as full is queued again with its arrival time; its wait is
    bounded from that first arrival, however often it bounces."""
    async def main():
        clock = FakeClock()
        sched = make_scheduler(clock, onprem=1, cloud=0, max_wait_ms=60_000)
        await sched.acquire(req(0))
        arrived = clock.now - 59.999  # it has waited almost the whole minute before it bounced
        started = asyncio.get_running_loop().time()
        with pytest.raises(QueueTimeout):
            await sched.acquire(req(1), arrived_at=arrived)
        late_s = asyncio.get_running_loop().time() - started
        clock.now += 0.001
        fresh = asyncio.create_task(sched.acquire(req(2)))  # a new arrival still gets the whole minute
        await settle()
        still_waiting = not fresh.done()
        fresh.cancel()
        return late_s, still_waiting

    late_s, still_waiting = asyncio.run(main())
    assert late_s < 5 and still_waiting

def test_a_group_with_no_healthy_replica_takes_nothing_and_retries_go_elsewhere_within_residency():
    async def main():
        sched = make_scheduler(FakeClock())
        sched.set_capacity("m@onprem", 0)  # its only replica is cooling down after a failure
        retry = await sched.acquire(req(0), retry=True)
        assert retry.group.site == "cloud" and retry.spill_reason == SPILL_REASON_FAILOVER
        with pytest.raises(NoHealthyEngine) as info:  # never to the cloud; a clear 503, not a wait
            await sched.acquire(req(2, DataClass.confidential))
        assert info.value.status == 503 and info.value.retry_after_s >= 1 and len(sched.queue) == 0
        waiting = asyncio.create_task(sched.acquire(req(3, DataClass.confidential)))
        sched.set_capacity("m@onprem", 2)  # the cooldown ended
        await settle()
        assert waiting.result().group.site == "onprem"

    asyncio.run(main())


def test_queued_requests_wait_out_a_cooldown_that_starts_while_they_wait():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=0, spill_after_ms=10**9)
        held = await sched.acquire(req(0))
        waiting = asyncio.create_task(sched.acquire(req(1, DataClass.confidential)))
        await settle()
        sched.set_capacity("m@onprem", 0)
        held.release()
        await settle()
        assert not waiting.done()  # admitted before the failure: it keeps its place
        sched.set_capacity("m@onprem", 1)
        await settle()
        assert waiting.result().group.site == "onprem"

    asyncio.run(main())


def test_cancelled_waiter_leaves_no_trace():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=0)
        held = await sched.acquire(req(0))
        waiter = asyncio.create_task(sched.acquire(req(1)))
        await settle()
        waiter.cancel()
        await settle()
        held.release()
        assert sched.in_flight["m@onprem"] == 0 and len(sched.queue) == 0

    asyncio.run(main())


def test_other_routers_sequences_count_against_free_capacity():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=4, cloud=4, spill_after_ms=10**9)
        mine = await sched.acquire(req(0))
        sched.observe_engine_load("m@onprem", 4)  # the engine holds 4: ours plus 3 from another router
        assert sched.others_in_flight["m@onprem"] == 3
        assert next(v for v in sched.views() if v.site == "onprem").free == 0
        waiting = asyncio.create_task(sched.acquire(req(2, DataClass.confidential)))
        await settle()
        assert not waiting.done()
        sched.observe_engine_load("m@onprem", 2)  # the other router's requests finished
        await settle()
        assert waiting.done() and waiting.result().group.site == "onprem"
        mine.release()

    asyncio.run(main())


def test_max_tokens_far_past_what_is_used_neither_looks_endless_nor_makes_other_answers_look_short():
    """max_tokens=10**9 is a valid request (the engine clamps it to the context). It is expected to
    run at most the context, and a stream of them answering 100 tokens does not teach the
    scheduler that a max_tokens=500 request will be short (the learned share alone would: 1e-7)."""
    sched = make_scheduler(FakeClock(), context_tokens=2048)
    assert sched.expected_tokens(10**9) == 2048
    assert sched.expected_tokens(-5) == 1 and sched.expected_tokens(0) == 1
    for _ in range(200):
        sched.observe_usage(10**9, 100)
    assert 95 <= sched.expected_tokens(500) <= 105  # the typical answer, not 500 x (100 / 10**9)
    assert sched.expected_tokens(50) == 50
    for _ in range(200):
        sched.observe_usage(500, 500)  # then answers that use what they ask for
    assert sched.expected_tokens(500) >= 450


def test_a_request_of_n_sequences_teaches_the_length_of_one():
    sched = make_scheduler(FakeClock())
    for _ in range(100):
        sched.observe_usage(100, 4 * 40, sequences=4)
    assert 40 <= sched.expected_tokens(100) <= 45


def test_engine_step_times_and_answer_lengths_feed_the_prediction():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=4, spill_after_ms=10**9)
        sched.observe_engine_load("m@onprem", 0, itl_ms=7.5, ttft_ms=120.0)
        assert (sched.speed["m@onprem"].itl_ms, sched.speed["m@onprem"].ttft_ms) == (7.5, 120.0)
        assert sched.expected_tokens(100) == 100  # until measured, answers run to max_tokens
        for _ in range(50):
            sched.observe_usage(100, 40)
        assert 40 <= sched.expected_tokens(100) <= 45
        assert sched.expected_tokens(None) == 256  # no max_tokens: assumed until measured
        await asyncio.sleep(0)

    asyncio.run(main())


def test_kv_cache_full_group_takes_nothing_until_it_drains():
    async def main():
        sched = make_scheduler(FakeClock(), onprem=4, cloud=0, spill_after_ms=10**9)
        sched.observe_engine_load("m@onprem", 0, kv_cache_usage=0.99)
        waiting = asyncio.create_task(sched.acquire(req(0)))
        await settle()
        assert not waiting.done()  # free sequences, but no KV-cache headroom
        sched.observe_engine_load("m@onprem", 0, kv_cache_usage=0.40)
        await settle()
        assert waiting.done() and waiting.result().group.site == "onprem"

    asyncio.run(main())


def test_a_release_under_a_deep_queue_places_only_what_the_freed_room_can_take():
    """The preferred site full and a long queue: a release grants the next request and stops there,
    instead of asking the placement pipeline about every queued request (a per-release cost that
    grew with the queue)."""
    async def main():
        sched = make_scheduler(FakeClock(), onprem=1, cloud=0, spill_after_ms=10**9, max_len=1_000)
        first = await sched.acquire(req(0))
        waiting = [asyncio.create_task(sched.acquire(req(i))) for i in range(1, 201)]
        await settle()
        placed = 0
        original = sched._place

        def counting(*args, **kwargs):
            nonlocal placed
            placed += 1
            return original(*args, **kwargs)

        sched._place = counting
        first.release()
        await settle()
        assert waiting[0].done() and not any(t.done() for t in waiting[1:])
        assert placed <= 3, placed
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(main())
