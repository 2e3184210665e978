"""Key format and checks, the sliding window's guarantee, and the admin API's input checks."""

from __future__ import annotations

import random

import pytest

from serve_app.errors import InvalidRequest
from serve_app.governance.keys import KeyRecord, KeySpec, KeyTable, check_admin_key, new_key, parse_key
from serve_app.governance.limits import SlidingWindow, format_duration
from serve_app.http.admin import usage_days


def test_a_key_is_checked_by_id_and_hashed_secret_and_never_stored_in_clear():
    key_id, plaintext, digest = new_key()
    assert plaintext.startswith(f"sk-spw-{key_id}.") and digest not in plaintext and len(digest) == 64
    table = KeyTable([KeyRecord(key_id, digest, KeySpec(tenant="acme"), 0.0)])
    assert table.check(plaintext).id == key_id
    wrong_secret = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    for bad in (wrong_secret, "", "sk-spw-", plaintext + "x", plaintext.upper(), "Bearer " + plaintext, "x" * 10_000):
        assert table.check(bad) is None
    revoked = KeyTable([KeyRecord(key_id, digest, KeySpec(tenant="acme"), 0.0, revoked_at=1.0)])
    assert revoked.check(plaintext) is None
    assert parse_key("x" * 100) is None  # bounded before any pattern work


def test_admin_key_needs_a_configured_key_and_an_exact_match():
    assert check_admin_key("s3cret", "s3cret")
    assert not check_admin_key("s3cret", None) and not check_admin_key("", "") and not check_admin_key("s3cre", "s3cret")


def test_the_sliding_window_never_admits_more_than_the_limit_in_any_60s_span():
    rng = random.Random(7)
    window, now, admitted = SlidingWindow(50), 0.0, []
    for _ in range(5_000):
        now += rng.expovariate(3.0)  # about 180 a minute against a limit of 50
        amount = rng.randint(1, 5)
        if window.fits(now, amount):
            window.take(now, amount)
            admitted.append((now, amount))
    assert len(admitted) > 100
    for start, _ in admitted:  # every span that starts at an admission
        assert sum(a for t, a in admitted if start <= t < start + 60) <= 50


def test_settling_an_entry_changes_the_window_only_while_it_is_inside():
    window = SlidingWindow(100)
    entry = window.take(0.0, 80)
    window.settle(entry, 30)
    assert window.remaining(1.0) == 70
    assert window.retry_after_s(1.0, 90) == pytest.approx(59.0)
    assert window.remaining(61.0) == 100
    window.settle(entry, 90)  # already out of the window: nothing changes
    assert window.remaining(61.0) == 100


def test_a_saved_window_is_small_and_read_back_it_never_lets_more_through():
    rng = random.Random(11)
    window, now, admitted = SlidingWindow(60_000), 1000.0, []
    for _ in range(20_000):  # about 330 entries a second, settled to other amounts
        now += rng.expovariate(330.0)
        amount = rng.randint(1, 20)
        if window.fits(now, amount):
            entry = window.take(now, amount)
            if rng.random() < 0.5:
                amount = rng.randint(0, 20)
                window.settle(entry, amount)
            admitted.append((now, amount))
    saved = window.dump()
    assert len(window.entries) > 1_000 and len(saved) <= 61  # one row per second, not per entry
    assert sum(a for _, a in saved) == window.total  # the seconds hold exactly what the window holds
    restored = SlidingWindow.load(60_000, saved, now)
    for later in (now, now + 10.3, now + 30.0, now + 59.5):
        exact = sum(a for t, a in admitted if t > later - 60)
        # Stamped at the end of their second: amounts leave up to 1 s late, never early.
        assert 60_000 - restored.remaining(later) >= exact
        assert 60_000 - restored.remaining(later) <= sum(a for t, a in admitted if t > later - 61)


def test_reset_durations_are_written_as_openai_does():
    assert format_duration(0.25) == "250ms" and format_duration(1.0) == "1s" and format_duration(360) == "6m0s"


def test_usage_periods_are_checked():
    assert usage_days("day", "2026-11-23") == ("2026-11-23", "2026-11-23")
    assert usage_days("month", "2026-11") == ("2026-11-01", "2026-11-31")
    for period, date in [("day", "9999-99-99"), ("day", "2026-02-30"), ("day", "\uff12\uff10\uff12\uff16-01-01"),
                         ("month", "2026-13"), ("month", "\u0662\u0660\u0662\u0666-01"), ("day", "2026-11")]:
        with pytest.raises(InvalidRequest):
            usage_days(period, date)
    for period, date in (("week", None), ("day", "2026-11"), ("month", "'; DROP TABLE usage; --")):
        with pytest.raises(InvalidRequest):
            usage_days(period, date)


def test_the_stream_restorer_puts_values_back_whatever_the_chunking():
    import json as _json

    from serve_app.pipeline.redact import Redaction, StreamRestorer

    redaction = Redaction({"[PII_EMAIL_1]": "ann@example.org", "[PII_IBAN_12]": "CH93 0076 2011 6238 5295 7"})
    said = "Mail [PII_EMAIL_1] (see [1], [x]) pay [PII_IBAN_12] or [PII_UNKNOWN_3]; end [PII_EMAIL_1]"
    expected = ("Mail ann@example.org (see [1], [x]) pay CH93 0076 2011 6238 5295 7 or [PII_UNKNOWN_3]; "
                "end ann@example.org")

    def event(text, finish=None):
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return b"data: " + _json.dumps({"choices": [choice]}).encode() + b"\n\n"

    for size in (1, 2, 3, 5, 7, 13, 100):
        restorer = StreamRestorer(redaction)
        pieces = [said[i:i + size] for i in range(0, len(said), size)]
        out = b"".join(restorer.feed(event(p)) for p in pieces) + restorer.feed(event("", "stop"))
        got = "".join(_json.loads(line[6:])["choices"][0]["delta"]["content"]
                      for line in out.decode().split("\n\n") if line.startswith("data: "))
        assert got == expected, size
    # A tail that looks like a placeholder's start is sent when the choice ends.
    restorer = StreamRestorer(redaction)
    first = restorer.feed(event("cut at [PII_EMA"))
    last = restorer.feed(event("", "length"))
    assert b"[PII_EMA" not in first and b"[PII_EMA" in last
