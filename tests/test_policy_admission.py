"""Admission queue with an injected clock: bounds, priority, aging (no starvation), expiry."""

import pytest

from serve_app.policy.admission import AdmissionParams, AdmissionQueue, QueuedRequest


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance_ms(self, ms):
        self.now += ms / 1000.0


@pytest.fixture
def clock():
    return FakeClock()


def make_queue(clock, **params):
    return AdmissionQueue(AdmissionParams(**params), clock=clock)


def test_bounded_length_rejects_with_429_and_retry_after(clock):
    queue = make_queue(clock, max_queue_len=2, max_queue_wait_ms=8000)
    assert queue.offer(QueuedRequest("a")) is None
    assert queue.offer(QueuedRequest("b")) is None
    rejection = queue.offer(QueuedRequest("c"))
    assert (rejection.status, rejection.reason) == (429, "queue_full")
    assert rejection.retry_after_s == 2.0
    assert len(queue) == 2


def test_fifo_within_a_priority_and_higher_priority_first(clock):
    queue = make_queue(clock)
    for rid, prio in [("low1", 0), ("high", 5), ("low2", 0), ("mid", 2)]:
        queue.offer(QueuedRequest(rid, priority=prio))
        clock.advance_ms(1)
    assert [queue.pop_best().request_id for _ in range(4)] == ["high", "mid", "low1", "low2"]
    assert queue.pop_best() is None


def test_aging_prevents_starvation(clock):
    queue = make_queue(clock, priority_aging_ms=1000)
    queue.offer(QueuedRequest("old-low", priority=0))
    clock.advance_ms(3500)  # 3.5 levels earned by waiting
    queue.offer(QueuedRequest("new-high", priority=3))
    assert queue.pop_best().request_id == "old-low"
    queue.offer(QueuedRequest("newer-high", priority=5))
    assert queue.pop_best().request_id == "newer-high"


def test_pop_best_skips_requests_that_cannot_run_and_keeps_them(clock):
    queue = make_queue(clock)
    queue.offer(QueuedRequest("confidential", priority=9, payload="onprem-only"))
    queue.offer(QueuedRequest("public", priority=0, payload="any"))
    only_cloud_free = lambda r: r.payload == "any"  # noqa: E731
    assert queue.pop_best(only_cloud_free).request_id == "public"
    assert queue.pop_best(only_cloud_free) is None
    assert len(queue) == 1
    assert queue.pop_best().request_id == "confidential"


def test_expire_returns_503_for_requests_past_max_wait(clock):
    queue = make_queue(clock, max_queue_wait_ms=1000)
    queue.offer(QueuedRequest("a"))
    clock.advance_ms(600)
    queue.offer(QueuedRequest("b"))
    clock.advance_ms(500)
    expired = queue.expire()
    assert [(r.request_id, rej.status, rej.reason) for r, rej in expired] == [("a", 503, "queue_timeout")]
    assert expired[0][1].retry_after_s >= 1
    assert queue.pop_best().request_id == "b"
    assert queue.oldest_wait_ms() == 0.0


def test_removed_requests_are_never_dispatched(clock):
    queue = make_queue(clock)
    gone, kept = QueuedRequest("gone"), QueuedRequest("kept")
    queue.offer(gone)
    queue.offer(kept)
    assert queue.remove(gone) and not queue.remove(gone)
    assert queue.pop_best() is kept and len(queue) == 0


def test_dispatch_never_exceeds_free_slots(clock):
    """Simulated continuous batching: 3 slots, 10 requests; a request leaves the queue only for a free slot."""
    queue = make_queue(clock)
    for i in range(10):
        queue.offer(QueuedRequest(f"r{i}"))
    slots, running, order = 3, [], []
    while len(queue) or running:
        while len(running) < slots and (req := queue.pop_best(lambda r: len(running) < slots)):
            running.append(req)
            order.append(req.request_id)
            assert len(running) <= slots
        running.pop(0)  # one stream ends, freeing one slot
        clock.advance_ms(10)
    assert order == [f"r{i}" for i in range(10)]
