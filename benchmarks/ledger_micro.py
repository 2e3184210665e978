"""The ledger's own cost, in one process (no Ray): admission, settlement, and one flush to SQLite
with the rate windows of a key and its tenant holding a minute of traffic at about 47 requests a
second (c64 in the peer benchmark). Baseline in the same run: the windows written as every entry
(what the ledger did before it kept per-second sums).

    python benchmarks/ledger_micro.py
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from serve_app.config.governance import GovernanceConfig
from serve_app.governance.keys import KeySpec, TenantSpec
from serve_app.governance.ledger import Ledger
from serve_app.governance.messages import AdmitRequest, Settlement
from serve_app.governance.store import SQLiteStore

REQUESTS = 2_800  # one minute at ~47 requests/s
FLUSHES = 20


def main() -> None:
    store = SQLiteStore(Path(tempfile.mkdtemp()) / "ledger.sqlite3")
    store.migrate()
    ledger = Ledger(store, GovernanceConfig())
    ledger.set_tenant("acme", TenantSpec(rpm=10**6, tpm=10**9))
    record, _ = ledger.create_key(KeySpec(tenant="acme", rpm=10**6, tpm=10**9))
    started = time.perf_counter()
    admitted = [ledger.admit(AdmitRequest("r", record.id, "acme", "m", 300, 100, 100, uuid.uuid4().hex))
                for _ in range(REQUESTS)]
    admit_us = (time.perf_counter() - started) * 1e6 / REQUESTS
    started = time.perf_counter()
    for answer in admitted:
        ledger.settle(Settlement("r", answer.reservation, record.id, "acme", "m", "onprem", 100, 64, 90))
    settle_us = (time.perf_counter() - started) * 1e6 / REQUESTS

    def flush_ms(all_entries: bool) -> float:
        started = time.perf_counter()
        for _ in range(FLUSHES):
            ledger.admit(AdmitRequest("r", record.id, "acme", "m", 300, 100, 100, uuid.uuid4().hex))
            pending = ledger.take_flush()
            if all_entries:  # the baseline: every entry of every changed window
                pending.windows = {k: [[e.at, e.amount] for e in ledger.windows[k].entries] for k in pending.windows}
            store.write(pending)
        return (time.perf_counter() - started) * 1000 / FLUSHES

    baseline, now = flush_ms(True), flush_ms(False)
    print(f"admit {admit_us:.0f} us, settle {settle_us:.0f} us per request")
    print(f"flush with 4 windows of {REQUESTS} entries: every entry {baseline:.1f} ms, per-second sums {now:.1f} ms "
          f"({baseline / now:.0f}x less); at one flush per 100 ms that is {baseline * 10:.0f} vs {now * 10:.0f} ms "
          "of CPU per second")


if __name__ == "__main__":
    main()
