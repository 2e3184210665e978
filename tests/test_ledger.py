"""The governance ledger against a real store: SQLite, and PostgreSQL on a real server (the same
tests for both). Wall-clock time is injected, so windows and periods are exact."""

from __future__ import annotations

import pytest

from serve_app.config.governance import GovernanceConfig
from serve_app.governance.budgets import MICROS
from serve_app.governance.keys import KeySpec, TenantSpec
from serve_app.governance.ledger import Ledger
from serve_app.governance.messages import Admission, AdmitRequest, Denial, Settlement
from serve_app.governance.store import PostgresStore, SQLiteStore

T0 = 1_795_000_000.0  # 2026-11-18 (UTC), a fixed wall-clock time


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    """Opens the same store again (a restarted ledger sees what the last one wrote)."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"

        def make():
            store = SQLiteStore(path)
            store.migrate()
            return store
    else:
        server = request.getfixturevalue("postgres_server")
        server.reset()

        def make():
            store = PostgresStore(server.dsn)
            store.migrate()
            return store
    return make


@pytest.fixture
def clock():
    return Clock()


def ledger_of(store_factory, clock, **settings) -> Ledger:
    return Ledger(store_factory(), GovernanceConfig(**settings), clock=clock)


def req(key_id=None, tenant="acme", tokens=100, cost=0.0, onprem=None, router="r1") -> AdmitRequest:
    return AdmitRequest(router, key_id, tenant, "m", tokens, int(cost * MICROS),
                        None if onprem is None else int(onprem * MICROS))


def settle(ledger, admission, prompt=10, completion=10, cost=0.0, router="r1", site="onprem") -> None:
    ledger.settle(Settlement(router, admission.reservation, None, admission.tenant, "m", site, prompt, completion,
                             int(cost * MICROS), admission.accounts))


def test_requests_per_minute_are_exact_in_any_60s_span(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(rpm=5))
    for i in range(5):
        answer = ledger.admit(req())
        assert isinstance(answer, Admission)
        assert answer.headers["x-ratelimit-remaining-requests"] == str(4 - i)
        clock.now += 1
    denied = ledger.admit(req())
    assert isinstance(denied, Denial) and denied.status == 429 and denied.code == "rate_limit_exceeded"
    # The first request leaves the window 60 s after it came (T0 + 60); now is T0 + 5.
    assert denied.retry_after_s == pytest.approx(55)
    clock.now = T0 + 60.001
    assert isinstance(ledger.admit(req()), Admission)
    assert isinstance(ledger.admit(req()), Denial)  # the second one (T0 + 1) is still inside


def test_tokens_are_reserved_at_admission_and_settled_with_real_usage(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(tpm=1000))
    first = ledger.admit(req(tokens=600))
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    assert isinstance(ledger.admit(req(tokens=600)), Denial)  # 600 reserved + 600 > 1000
    settle(ledger, first, prompt=50, completion=50)  # really used 100
    second = ledger.admit(req(tokens=600))
    assert isinstance(second, Admission) and second.headers["x-ratelimit-remaining-tokens"] == "300"


def test_key_and_tenant_limits_both_hold_and_headers_show_the_tighter(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(rpm=3))
    key, _ = ledger.create_key(KeySpec(tenant="acme", rpm=10))
    other, _ = ledger.create_key(KeySpec(tenant="acme"))
    a = ledger.admit(req(key.id))
    assert a.headers["x-ratelimit-limit-requests"] == "3" and a.headers["x-ratelimit-remaining-requests"] == "2"
    ledger.admit(req(other.id))
    ledger.admit(req(key.id))
    denied = ledger.admit(req(other.id))
    assert isinstance(denied, Denial) and "tenant:acme" in denied.message


def test_a_revoked_or_unknown_key_is_refused_by_the_ledger_at_once(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    key, _ = ledger.create_key(KeySpec(tenant="acme"))
    assert isinstance(ledger.admit(req(key.id)), Admission)
    ledger.revoke_key(key.id)
    assert ledger.admit(req(key.id)).status == 401
    assert ledger.admit(req("0123456789ab")).status == 401


def test_rotation_revokes_the_old_key_and_keeps_its_rules(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    key, _ = ledger.create_key(KeySpec(tenant="acme", tier=3, models=["m"], rpm=7))
    new, plaintext = ledger.rotate_key(key.id)
    assert new.id != key.id and new.spec == key.spec and plaintext.startswith("sk-spw-" + new.id + ".")
    assert ledger.keys[key.id].revoked_at is not None
    assert ledger.rotate_key(key.id) is None  # a revoked key cannot be rotated again


def test_budget_refuses_once_reservations_and_spend_would_pass_it(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(budgets=[{"period": "day", "limit": 1.0}]))
    held = [ledger.admit(req(cost=0.3)) for _ in range(3)]  # 0.9 reserved, none settled yet
    assert all(isinstance(a, Admission) for a in held)
    refused = ledger.admit(req(cost=0.3))
    assert refused.status == 429 and refused.code == "insufficient_quota"
    settle(ledger, held[0], cost=0.05)  # really cost 0.05: 0.25 of room comes back
    assert isinstance(ledger.admit(req(cost=0.3)), Admission)
    assert ledger.spend_of("tenant:acme", "day")["spent"] == pytest.approx(0.05)


def test_on_prem_only_policy_keeps_serving_on_prem_once_spent(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(budgets=[{"period": "month", "limit": 0.5, "policy": "onprem_only"}]))
    first = ledger.admit(req(cost=0.4, onprem=0.1))
    assert not first.onprem_only and first.cost == int(0.4 * MICROS)
    settle(ledger, first, cost=0.4)
    after = ledger.admit(req(cost=0.4, onprem=0.1))
    assert after.onprem_only and after.cost == int(0.1 * MICROS)
    assert ledger.admit(req(cost=0.4, onprem=None)).code == "insufficient_quota"  # no on-prem site for it


def test_alerts_fire_once_per_threshold_and_period(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(budgets=[{"period": "day", "limit": 1.0}]))
    for cost in (0.3, 0.3, 0.25):  # 30 %, 60 % (fires 50), 85 % (fires 80)
        settle(ledger, ledger.admit(req(cost=0.1)), cost=cost)
    fired = [(a["scope"], a["threshold_pct"]) for a in ledger.alerts_out]
    assert fired == [("tenant:acme", 50), ("tenant:acme", 80)]
    ledger.alerts_out.clear()
    clock.now += 86_400  # the next day: a new period, nothing spent yet
    assert ledger.admit(req(cost=0.9)).cost == int(0.9 * MICROS)
    assert ledger.alerts_out == []


def test_a_silent_routers_reservations_are_charged_in_full_then_corrected(store_factory, clock):
    ledger = ledger_of(store_factory, clock, router_lost_after_s=10)
    ledger.set_tenant("acme", TenantSpec(budgets=[{"period": "day", "limit": 10.0}], tpm=10_000))
    held = ledger.admit(req(cost=0.5, tokens=500, router="dead"))
    ledger.admit(req(cost=0.5, tokens=500, router="alive"))
    clock.now += 5
    ledger.heartbeat("alive")
    clock.now += 6
    assert ledger.reap() == 1  # only the silent router's reservation
    assert ledger.state()["open_reservations"] == 1
    assert ledger.spend_of("tenant:acme", "day") == {"scope": "tenant:acme", "period": "day:2026-11-18",
                                                     "spent": 0.5, "reserved": 0.5}
    settle(ledger, held, cost=0.2, router="dead")  # it was alive after all: the real cost replaces the charge
    assert ledger.spend_of("tenant:acme", "day")["spent"] == pytest.approx(0.2)


def test_spend_usage_keys_and_windows_survive_a_restart(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.set_tenant("acme", TenantSpec(rpm=2, budgets=[{"period": "day", "limit": 1.0}]))
    key, plaintext = ledger.create_key(KeySpec(tenant="acme"))
    settle(ledger, ledger.admit(req(key.id, cost=0.3)), prompt=7, completion=5, cost=0.25)
    ledger.admit(req(key.id, cost=0.3))  # in flight when the ledger stops
    ledger.store.write(ledger.take_flush())
    ledger.store.close()

    again = ledger_of(store_factory, clock)
    assert again.keys[key.id].hash == ledger.keys[key.id].hash
    assert again.spend_of("tenant:acme", "day")["spent"] == pytest.approx(0.25)
    assert again.spend_of(f"key:{key.id}", "day")["spent"] == pytest.approx(0.25)
    assert again.admit(req(key.id)).status == 429  # both requests of this minute are remembered
    rows = again.store.usage("2026-11-18", "2026-11-18", ("tenant", "key_id", "model", "site"))
    assert rows == [{"tenant": "acme", "key_id": key.id, "model": "m", "site": "onprem", "requests": 1,
                     "prompt_tokens": 7, "completion_tokens": 5, "cost": 0.25}]


def test_a_settlement_batch_counts_once_also_across_a_restart_of_the_ledger(store_factory, clock):
    """A router resends a batch whose answer it lost, under its number. The number is written with
    the spend it caused: a restarted ledger that wrote the batch skips it, one that crashed before
    writing it (its spend lost too) applies it again."""
    ledger = ledger_of(store_factory, clock)
    batch = Settlement("r1", None, None, "acme", "m", "onprem", 1, 1, int(0.25 * MICROS))
    assert ledger.accept_batch("r1", 1)
    ledger.settle(batch)
    assert not ledger.accept_batch("r1", 1)  # the resend, same process
    ledger.store.write(ledger.take_flush())
    assert ledger.accept_batch("r1", 2)  # applied, never written: the ledger crashes here
    ledger.settle(batch)
    ledger.store.close()

    again = ledger_of(store_factory, clock)
    assert not again.accept_batch("r1", 1)  # written with its spend: counted once
    assert again.accept_batch("r1", 2)  # lost with its spend: applied again
    again.settle(batch)
    assert again.accept_batch("r2", 1)  # another router numbers its own batches
    assert again.spend_of("tenant:acme", "day")["spent"] == pytest.approx(0.5)
    again.store.write(again.take_flush())
    again.store.close()
    clock.now += 8 * 86400  # a router silent for a week is forgotten
    assert ledger_of(store_factory, clock).batches == {}


def test_settlements_without_admission_are_counted_as_usage(store_factory, clock):
    """The open demo (no keys) and a ledger that restarted while requests ran."""
    ledger = ledger_of(store_factory, clock)
    for tenant, site in (("team-a", "onprem"), ("team-a", "cloud"), ("team-b", "onprem")):
        ledger.settle(Settlement("r1", None, None, tenant, "m", site, 10, 20, int(0.01 * MICROS)))
    ledger.store.write(ledger.take_flush())
    by_tenant = ledger.store.usage("2026-11-18", "2026-11-18", ("tenant",))
    assert by_tenant == [
        {"tenant": "team-a", "requests": 2, "prompt_tokens": 20, "completion_tokens": 40, "cost": 0.02},
        {"tenant": "team-b", "requests": 1, "prompt_tokens": 10, "completion_tokens": 20, "cost": 0.01}]
    assert ledger.spend_of("tenant:team-a", "month")["spent"] == pytest.approx(0.02)


def test_a_failed_write_is_kept_for_the_next_one(store_factory, clock):
    ledger = ledger_of(store_factory, clock)
    ledger.settle(Settlement("r1", None, None, "acme", "m", "onprem", 1, 1, 100))
    failed = ledger.take_flush()
    ledger.settle(Settlement("r1", None, None, "acme", "m", "onprem", 1, 1, 100))
    ledger.restore_flush(failed)
    ledger.store.write(ledger.take_flush())
    assert ledger.store.usage("2026-11-18", "2026-11-18", ())[0]["requests"] == 2
