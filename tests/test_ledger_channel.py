"""The admission channel (``serve_app/governance/channel.py``) over real loopback sockets: the real
ledger service and its port, the real router-side client. The ledger's Serve handle is a FAKE that
awaits the service in-process (the e2e tests use the real one)."""

from __future__ import annotations

import asyncio
import struct
import uuid
from types import SimpleNamespace

from serve_app.governance import channel
from serve_app.governance.client import LedgerClient, LedgerUnavailable
from serve_app.governance.messages import Admission, AdmitRequest, Denial, Settlement
from serve_app.governance.service import LedgerService
from tests.test_request_path import MODEL, config, run, wait_for


class FakeHandle:
    """A FAKE Serve handle: ``handle.method.remote(*args)`` awaits the service's method; counts calls."""

    def __init__(self, service: LedgerService, hide_endpoint: bool = False):
        self.service = service
        self.calls: dict[str, int] = {}
        self.hide_endpoint = hide_endpoint

    def __getattr__(self, name):
        method = getattr(self.service, name)

        def remote(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "endpoint" and self.hide_endpoint:
                async def closed():
                    return None
                return closed()
            return method(*args)

        return SimpleNamespace(remote=remote)


def service(tmp_path, **governance) -> LedgerService:
    raw = config().model_dump(mode="json")
    raw["governance"] = {"store": {"path": str(tmp_path / "ledger.sqlite3")}, "settle_batch_ms": 5, **governance}
    return LedgerService(raw)


def request(router: str, key_id: str | None, tokens: int = 10, tenant: str = "acme") -> AdmitRequest:
    return AdmitRequest(router, key_id, tenant, MODEL, tokens, 100, 100, uuid.uuid4().hex)


async def started(tmp_path) -> tuple[LedgerService, FakeHandle, LedgerClient]:
    """A ledger service, its FAKE handle and a router's client that has read the key table."""
    svc = service(tmp_path)
    handle = FakeHandle(svc)
    client = LedgerClient(handle, svc.settings)
    client.start()
    await client.ready()
    return svc, handle, client


def break_after_answering(svc: LedgerService):
    """The port answers the next frames, then breaks the connection before the answer leaves;
    returns the way back to normal."""
    original = svc.port._answer

    def answer_then_break(message):
        answered = original(message)
        for writer in list(svc.port._connections):
            writer.transport.abort()
        return answered

    svc.port._answer = answer_then_break
    return lambda: setattr(svc.port, "_answer", original)


def test_admissions_go_over_the_port_and_match_their_requests(tmp_path):
    async def main():
        svc = service(tmp_path)
        await svc.set_tenant("acme", {"tpm": 100_000, "rpm": 150})
        key = await svc.create_key({"tenant": "acme"})
        handle = FakeHandle(svc)
        client = LedgerClient(handle, svc.settings)
        client.start()
        answers = await asyncio.gather(*(client.admit(request(client.router_id, key["id"], tokens=10 + i))
                                         for i in range(200)))
        await client.close()
        await svc.close()
        return handle.calls, answers, svc.ledger.state()

    calls, answers, state = run(main())
    admitted = [a for a in answers if isinstance(a, Admission)]
    denied = [a for a in answers if isinstance(a, Denial)]
    # Every answer is the one for its own request (tokens differ per request), in one connection.
    assert [a.tokens for a in admitted] == [10 + i for i in range(150)]
    assert len(denied) == 50 and {d.code for d in denied} == {"rate_limit_exceeded"}
    assert all(d.retry_after_s > 0 for d in denied)
    assert admitted[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert calls.get("admit", 0) == 0 and calls["endpoint"] == 1
    assert state["open_reservations"] == 150


def test_an_admission_the_ledger_fails_on_is_refused_alone_and_the_connection_serves_on(tmp_path):
    """The ledger raises on one admission: that request gets a 503 denial (fail closed) and holds
    nothing; the admissions in flight beside it on the same connection are answered as usual."""
    async def main():
        svc = service(tmp_path)
        key = await svc.create_key({"tenant": "acme"})
        real_admit = svc.ledger.admit

        def admit(req):
            if req.tokens == 13:
                raise OverflowError("cannot convert float infinity to integer")
            return real_admit(req)

        svc.ledger.admit = admit
        client = LedgerClient(FakeHandle(svc), svc.settings)
        client.start()
        answers = await asyncio.gather(*(client.admit(request(client.router_id, key["id"], tokens=10 + i))
                                         for i in range(8)))
        later = await client.admit(request(client.router_id, key["id"], tokens=30))
        await client.close()
        await svc.close()
        return answers, later, svc.ledger.state()

    answers, later, state = run(main())
    assert [type(a).__name__ for a in answers] == ["Admission"] * 3 + ["Denial"] + ["Admission"] * 4
    assert (answers[3].status, answers[3].code) == (503, "governance_unavailable")
    assert isinstance(later, Admission)
    assert state["open_reservations"] == 8


def test_budgets_and_limits_past_what_the_ledger_can_count_are_refused_when_set(tmp_path):
    import pydantic
    import pytest

    async def main():
        svc = service(tmp_path)
        for spec in ({"budgets": [{"period": "day", "limit": 1e308}]},
                     {"budgets": [{"period": "day", "limit": float("nan")}]}, {"rpm": 10**30}, {"tpm": 10**30}):
            with pytest.raises(pydantic.ValidationError):
                await svc.set_tenant("acme", spec)
        await svc.set_tenant("acme", {"budgets": [{"period": "day", "limit": 1e12}]})
        key = await svc.create_key({"tenant": "acme"})
        answer = svc.ledger.admit(request("r", key["id"]))
        await svc.close()
        return answer

    assert isinstance(run(main()), Admission)


def test_a_router_that_cannot_reach_the_port_admits_through_the_handle(tmp_path):
    async def main():
        svc = service(tmp_path)
        key = await svc.create_key({"tenant": "acme"})
        handle = FakeHandle(svc, hide_endpoint=True)
        client = LedgerClient(handle, svc.settings)
        first = await client.admit(request(client.router_id, key["id"]))
        second = await client.admit(request(client.router_id, key["id"]))
        await client.close()
        await svc.close()
        return handle.calls, first, second

    calls, first, second = run(main())
    assert isinstance(first, Admission) and isinstance(second, Admission)
    # One failed look for the port, then the handle until the retry pause is over.
    assert calls["admit"] == 2 and calls["endpoint"] == 1


def test_an_answer_lost_with_its_connection_is_voided_never_admitted_twice(tmp_path):
    async def main():
        svc, handle, client = await started(tmp_path)
        key = await svc.create_key({"tenant": "acme"})
        assert isinstance(await client.admit(request(client.router_id, key["id"])), Admission)
        # The ledger admits the next request, then its connection breaks before the answer leaves.
        restore = break_after_answering(svc)
        lost = request(client.router_id, key["id"])
        try:
            await client.admit(lost)
            outcome = "answered"
        except LedgerUnavailable as exc:
            outcome = str(exc)
        restore()
        held = lost.id in svc.ledger.reservations
        await wait_for(lambda: lost.id not in svc.ledger.reservations, timeout_s=5)
        released = lost.id not in svc.ledger.reservations
        late = svc.ledger.admit(lost)  # the same admission arriving again is refused
        # The next request goes through the handle while the port rests, then the port again.
        after = await client.admit(request(client.router_id, key["id"]))
        await client.close()
        await svc.close()
        return outcome, held, released, late, after, svc.ledger.reserved

    outcome, held, released, late, after, reserved = run(main())
    assert "answer was lost" in outcome
    assert held and released
    assert isinstance(late, Denial) and late.status == 503
    assert isinstance(after, Admission)
    # Only the first and the last admission hold money; the lost one gave its reservation back.
    assert set(reserved.values()) == {200}


def test_the_port_closes_connections_without_the_secret_or_with_bad_frames_and_serves_on(tmp_path):
    async def main():
        svc = service(tmp_path)
        key = await svc.create_key({"tenant": "acme"})
        handle = FakeHandle(svc)
        endpoint = await svc.endpoint()
        host, port, secret = endpoint["host"], endpoint["port"], bytes.fromhex(endpoint["secret"])

        async def attempt(hello: bytes, payload: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(hello + payload)
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        good = channel.frame({"i": 1, "admit": vars(request("r", key["id"]))})
        results = {
            "wrong secret": await attempt(channel.HELLO + b"\0" * 32, good),
            "no hello": await attempt(b"", good),
            "huge frame": await attempt(channel.HELLO + secret, struct.pack("!I", 10**9) + b"x" * 100),
            "not json": await attempt(channel.HELLO + secret, struct.pack("!I", 5) + b"{{{{{"),
            "wrong fields": await attempt(channel.HELLO + secret, channel.frame({"i": 2, "admit": {"x": 1}})),
        }
        client = LedgerClient(handle, svc.settings)
        still = await client.admit(request(client.router_id, key["id"]))
        await client.close()
        await svc.close()
        return results, still, svc.ledger.state()

    results, still, state = run(main())
    assert results == {name: b"" for name in results}  # closed, nothing answered
    assert isinstance(still, Admission)
    assert state["open_reservations"] == 1  # the refused frames admitted nothing


def settlement(router: str, reservation: str | None = None, cost: int = 1_000) -> Settlement:
    return Settlement(router, reservation, None, "acme", MODEL, "onprem", 3, 4, cost)


def test_settlement_batches_and_audit_records_go_over_the_port(tmp_path):
    async def main():
        svc, handle, client = await started(tmp_path)
        key = await svc.create_key({"tenant": "acme"})
        admitted = await client.admit(request(client.router_id, key["id"], tokens=10))
        client.settle(Settlement(client.router_id, admitted.reservation, key["id"], "acme", MODEL, "onprem", 3, 4, 70,
                                 admitted.accounts))
        client.settle(settlement(client.router_id, cost=30))
        client.audit({"request_id": "r-1", "tenant": "acme", "tokens": [3, 4]})
        await client.sync()
        pending = list(svc._audit_pending)
        await client.close()
        state, spent = svc.ledger.state(), svc.ledger.spend_of("tenant:acme", "day")
        await svc.close()
        return handle.calls, state, spent, pending

    calls, state, spent, pending = run(main())
    assert calls.get("sync", 0) == 0 and calls.get("admit", 0) == 0  # all over the port
    assert state["open_reservations"] == 0  # the admitted request settled to its real cost
    assert round(spent["spent"] * 1_000_000) == 100 and spent["reserved"] == 0
    assert pending == [{"request_id": "r-1", "tenant": "acme", "tokens": [3, 4]}]


def test_a_batch_whose_answer_was_lost_is_sent_again_under_its_number_and_counted_once(tmp_path):
    async def main():
        svc, handle, client = await started(tmp_path)
        await client.sync()  # connects the port
        restore = break_after_answering(svc)  # the ledger applies the next batch; its answer never leaves
        client.settle(settlement(client.router_id, cost=500))
        try:
            await client.sync()
            first = "answered"
        except LedgerUnavailable as exc:
            first = str(exc)
        restore()
        after_loss = svc.ledger.spend_of("tenant:acme", "day")["spent"]
        client.settle(settlement(client.router_id, cost=7))
        await client.sync()  # the lost batch again (through the handle while the port rests), then the new one
        await client.close()
        spent = svc.ledger.spend_of("tenant:acme", "day")["spent"]
        await svc.close()
        return first, after_loss, spent, handle.calls

    first, after_loss, spent, calls = run(main())
    assert "answer was lost" in first
    assert round(after_loss * 1_000_000) == 500  # applied before the connection broke
    assert round(spent * 1_000_000) == 507  # the resent batch was not counted twice
    assert calls["sync"] >= 1  # the resend went through the handle


def test_a_batch_over_the_ports_frame_limit_goes_through_the_handle(tmp_path, monkeypatch):
    monkeypatch.setattr(channel, "MAX_FRAME_BYTES", 4096)

    async def main():
        svc, handle, client = await started(tmp_path)
        client.settle(settlement(client.router_id, cost=1))
        await client.sync()
        small = dict(handle.calls)
        client.audit({"request_id": "big", "text": "x" * 10_000})
        client.settle(settlement(client.router_id, cost=2))
        await client.sync()
        await client.close()
        spent = svc.ledger.spend_of("tenant:acme", "day")["spent"]
        pending = [r["request_id"] for r in svc._audit_pending]
        await svc.close()
        return small, handle.calls, spent, pending

    small, calls, spent, pending = run(main())
    assert small.get("sync", 0) == 0 and calls["sync"] == 1
    assert round(spent * 1_000_000) == 3 and pending == ["big"]


def test_a_heartbeat_carries_no_batch_number_and_gives_the_store_nothing_to_write(tmp_path):
    async def main():
        svc, handle, client = await started(tmp_path)
        for _ in range(3):
            await client.sync()  # nothing queued: heartbeats
        idle = (dict(svc.ledger.batches), bool(svc.ledger.pending), client.router_id in svc.ledger.routers)
        client.settle(settlement(client.router_id, cost=5))
        await client.sync()
        busy = dict(svc.ledger.batches)
        await client.close()
        await svc.close()
        return idle, busy, client.router_id

    (batches, pending, seen), busy, router = run(main())
    assert batches == {} and not pending and seen  # the ledger heard it, and has nothing to write
    assert busy == {router: 1}  # the first batch with something in it is number 1


def test_the_ledgers_denials_become_the_errors_their_status_says():
    from serve_app.errors import AuthenticationFailed, GovernanceUnavailable, QuotaExceeded, RateLimited
    from serve_app.pipeline.govern import _error

    assert isinstance(_error(Denial(401, "invalid_api_key", "no")), AuthenticationFailed)
    assert isinstance(_error(Denial(429, "insufficient_quota", "spent")), QuotaExceeded)
    assert isinstance(_error(Denial(429, "rate_limit_exceeded", "slow down", 3.0)), RateLimited)
    for code in ("governance_unavailable", "ledger_request_void"):  # (a void was answered as a 429 before)
        error = _error(Denial(503, code, "could not decide.", 2.0))
        assert isinstance(error, GovernanceUnavailable) and error.status == 503 and error.retry_after_s == 2.0
