"""The ledger: the one authority for keys, rate limits, budgets and usage, for every router replica.

One ledger per cluster (a Serve deployment with one replica, ``governance/service.py``) keeps
the live state in memory and answers from it; routers call it once per keyed request (``admit``:
key still active, limits, budget, all checked and reserved in one step) and send settlements in
batches (``sync``). Because one process decides, a limit is a limit for the sum over all router
replicas, whatever their number (LiteLLM's per-pod pre-check makes it limit x replicas, #27736).

Exactness (what can pass a limit, and by how much):
- requests per minute: exact; in any 60 s span at most ``rpm`` requests are admitted;
- tokens per minute and budgets: admission reserves the estimate (prompt estimate + ``max_tokens``
  x sequences; the most the request can cost on any site it may use) and settles to the real
  count. They can only be passed by requests whose real prompt exceeds the estimate, by that
  difference, summed over the requests in flight;
- a router replica that dies: its open reservations are charged in full (estimate) once it has
  been silent for ``router_lost_after_s``; nothing leaks (LiteLLM #27639);
- the ledger process itself: spend, usage and windows are written to the store every
  ``flush_interval_ms`` and on shutdown; a crash loses at most that interval's settlements,
  and the reservations in flight then (their settlements, arriving later, are still counted).

- an admission whose answer the router never got: voided by the router's next sync (released if
  it was admitted, refused if it arrives after), so it never holds budget and never runs twice;
- a settlement batch whose answer the router never got: sent again under its number and counted
  once, also across a restart of the ledger (``accept_batch``).

Cost per request: one admission over the ledger's port (``channel.py``; a frame each way on one
TCP connection per router, answered from memory, no database round trip), one settlement in a
batch of up to ``settle_batch_ms``; writes are batched off the request path.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from serve_app.config.governance import GovernanceConfig
from serve_app.governance.budgets import MICROS, PERIODS, crossed, fits, period_key
from serve_app.governance.keybook import KeyBook
from serve_app.governance.keys import KeyRecord, KeySpec, LimitSpec, TenantSpec
from serve_app.governance.limits import SlidingWindow, format_duration
from serve_app.governance.messages import Admission, AdmitRequest, Denial, Settlement
from serve_app.governance.store import Flush, Store

logger = logging.getLogger("spillway.ledger")

NO_KEY = "-"
REAPED_REMEMBERED = 100_000
VOIDED_REMEMBERED = 100_000
LIMIT_KINDS = (("requests", "rpm"), ("tokens", "tpm"))
DEFAULT_TENANT = TenantSpec()


@dataclass
class Reservation:
    id: str
    router: str
    tenant: str
    key_id: str | None
    model: str
    accounts: tuple[tuple[str, str], ...]
    cost: int
    tokens: int
    token_entries: list = field(default_factory=list)  # (window key, window entry)
    at: float = 0.0


class Ledger(KeyBook):
    def __init__(self, store: Store, settings: GovernanceConfig, clock=time.time):
        self.store = store
        self.settings = settings
        self.clock = clock
        snapshot = store.load(clock())
        self.tenants: dict[str, TenantSpec] = {n: TenantSpec.model_validate(s) for n, s in snapshot.tenants.items()}
        self.keys: dict[str, KeyRecord] = {
            k["id"]: KeyRecord(k["id"], k["hash"], KeySpec.model_validate(k["spec"]), k["created_at"], k["revoked_at"])
            for k in snapshot.keys}
        self.version = int(clock() * 1000)  # a restarted ledger's table never looks unchanged to routers
        self.spend: dict[tuple[str, str], int] = dict(snapshot.spend)
        self.reserved: dict[tuple[str, str], int] = {}
        self.alerted: dict[tuple[str, str], set[int]] = {}  # (scope, period): thresholds fired
        for scope, period, threshold in snapshot.alerts:
            self.alerted.setdefault((scope, period), set()).add(threshold)
        self._saved_windows = snapshot.windows
        self.windows: dict[tuple[str, str], SlidingWindow] = {}
        self.reservations: dict[str, Reservation] = {}
        self.reaped: OrderedDict[str, Reservation] = OrderedDict()
        self.voided: OrderedDict[str, None] = OrderedDict()  # ids whose admission the router gave up on
        self.routers: dict[str, float] = {}
        self.batches: dict[str, int] = dict(snapshot.batches)  # router -> its last settlement batch applied
        self.pending = Flush()
        self._dirty_windows: set[tuple[str, str]] = set()
        self.alerts_out: list[dict] = []  # fired alerts, for the service to log, count and post

    # ---- admission and settlement ----------------------------------------------------------------

    def admit(self, req: AdmitRequest) -> Admission | Denial:
        now = self.clock()
        self.routers[req.router] = now
        if req.id and (req.id in self.voided or req.id in self.reservations):
            return Denial(503, "ledger_request_void", "This admission was given up by its router; try again.")
        tenant = req.tenant
        scopes: list[tuple[str, LimitSpec]] = []
        if req.key_id is not None:
            record = self.keys.get(req.key_id)
            if record is None or record.revoked_at is not None:
                return Denial(401, "invalid_api_key", "Incorrect API key provided (unknown or revoked).")
            tenant = record.tenant
            scopes.append((f"key:{record.id}", record.spec))
        scopes.append((f"tenant:{tenant}", self.tenants.get(tenant, DEFAULT_TENANT)))

        blocked = []
        for scope, spec in scopes:
            for kind, attr in LIMIT_KINDS:
                limit = getattr(spec, attr)
                amount = 1 if kind == "requests" else req.tokens
                if limit is not None:
                    window = self._window(scope, kind, limit, now)
                    if not window.fits(now, amount):
                        blocked.append((window.retry_after_s(now, amount), scope, kind, limit, amount))
        if blocked:
            retry, scope, kind, limit, amount = max(blocked)
            what = f"{amount} tokens" if kind == "tokens" else "1 request"
            return Denial(429, "rate_limit_exceeded",
                          f"Rate limit reached for {scope}: {limit} {kind} per minute; this request needs {what}. "
                          f"Try again in {format_duration(retry)}.", retry, self._headers(scopes, now))

        onprem_only = False
        for scope, spec in scopes:
            for budget in spec.budgets:
                account = (scope, period_key(budget.period, now))
                if not fits(int(round(budget.limit * MICROS)), self.spend.get(account, 0),
                            self.reserved.get(account, 0), req.cost_any):
                    if budget.policy == "refuse":
                        return Denial(429, "insufficient_quota",
                                      f"Budget exhausted for {scope} ({budget.period}: {budget.limit:g}). "
                                      "You exceeded your current quota.")
                    onprem_only = True
        cost = req.cost_any
        if onprem_only:
            if req.cost_onprem is None:
                return Denial(429, "insufficient_quota", f"Budget exhausted for tenant {tenant}, and model "
                              f"{req.model!r} has no on-prem site to fall back to.")
            cost = req.cost_onprem

        reservation = Reservation(req.id or uuid.uuid4().hex, req.router, tenant, req.key_id, req.model,
                                  self._accounts([s for s, _ in scopes], now), cost, req.tokens, at=now)
        for scope, spec in scopes:
            if spec.rpm is not None:
                self._window(scope, "requests", spec.rpm, now).take(now, 1)
                self._dirty_windows.add((scope, "requests"))
            if spec.tpm is not None:
                window = self._window(scope, "tokens", spec.tpm, now)
                reservation.token_entries.append(((scope, "tokens"), window.take(now, req.tokens)))
                self._dirty_windows.add((scope, "tokens"))
        for account in reservation.accounts:
            self.reserved[account] = self.reserved.get(account, 0) + cost
        self.reservations[reservation.id] = reservation
        return Admission(reservation.id, tenant, onprem_only, reservation.accounts, cost, req.tokens,
                         self._headers(scopes, now))

    def settle(self, s: Settlement) -> None:
        now = self.clock()
        self.routers[s.router] = now
        tokens = s.prompt_tokens + s.completion_tokens
        reservation = self.reservations.pop(s.reservation, None) if s.reservation else None
        if reservation is None and s.reservation in self.reaped:
            # Charged in full when its router went silent; now the real figures arrived.
            charged = self.reaped.pop(s.reservation)
            self._settle_tokens(charged, tokens)
            self._charge(charged.accounts, s.cost - charged.cost, now)
            self._usage(now, charged.tenant, charged.key_id, charged.model, s.site, 0,
                        s.prompt_tokens - charged.tokens, s.completion_tokens, s.cost - charged.cost)
            return
        if reservation is not None:
            self._release(reservation)
            self._settle_tokens(reservation, tokens)
            accounts, tenant, key_id = reservation.accounts, reservation.tenant, reservation.key_id
        else:
            # Open mode (no admission), or admitted by a ledger process that is gone.
            tenant, key_id = s.tenant, s.key_id
            scopes = ([f"key:{s.key_id}"] if s.key_id else []) + [f"tenant:{tenant}"]
            accounts = s.accounts or self._accounts(scopes, now)
        self._charge(accounts, s.cost, now)
        self._usage(now, tenant, key_id, s.model, s.site, 1, s.prompt_tokens, s.completion_tokens, s.cost)

    def void(self, router: str, reservation_id: str) -> bool:
        """A router gave up waiting for this admission's answer (a timeout, a lost connection): the
        request never ran. Release what it holds if it was admitted; refuse it if it arrives later."""
        self.routers[router] = self.clock()
        self.voided[reservation_id] = None
        while len(self.voided) > VOIDED_REMEMBERED:
            self.voided.popitem(last=False)
        reservation = self.reservations.pop(reservation_id, None)
        if reservation is None:
            return False
        self._release(reservation)
        self._settle_tokens(reservation, 0)
        return True

    def accept_batch(self, router: str, batch: int) -> bool:
        """Whether a router's settlement batch is new (then it is counted as applied). A router
        sends a batch whose answer it lost again under its number; the number is written with the
        spend it caused, in the same transaction, so a batch counts once also across a restart of
        the ledger (one that crashed before writing it applies it again: its spend was lost too)."""
        if batch <= self.batches.get(router, 0):
            return False
        self.batches[router] = batch
        self.pending.batches[router] = (batch, self.clock())
        return True

    def heartbeat(self, router: str) -> None:
        self.routers[router] = self.clock()

    def reap(self) -> int:
        """Charge the open reservations of routers silent past ``router_lost_after_s`` in full."""
        now = self.clock()
        lost = {r for r, seen in self.routers.items() if now - seen > self.settings.router_lost_after_s}
        if not lost:
            return 0
        charged = 0
        for res_id, reservation in list(self.reservations.items()):
            if reservation.router not in lost:
                continue
            del self.reservations[res_id]
            self._release(reservation)
            self._charge(reservation.accounts, reservation.cost, now)
            self._usage(now, reservation.tenant, reservation.key_id, reservation.model, "router-lost", 1,
                        reservation.tokens, 0, reservation.cost)
            self.reaped[res_id] = reservation
            while len(self.reaped) > REAPED_REMEMBERED:
                self.reaped.popitem(last=False)
            charged += 1
        for router in lost:
            del self.routers[router]
        if charged:
            logger.warning("charged %d open reservation(s) of router replica(s) %s, silent for over %.0f s",
                           charged, sorted(lost), self.settings.router_lost_after_s)
        return charged

    # ---- reports ---------------------------------------------------------------------------------

    def budgets(self) -> list[dict]:
        now = self.clock()
        rows = []
        scopes = [(f"tenant:{n}", s) for n, s in self.tenants.items()] + \
                 [(f"key:{k.id}", k.spec) for k in self.keys.values() if k.revoked_at is None]
        for scope, spec in scopes:
            for budget in spec.budgets:
                account = (scope, period_key(budget.period, now))
                spent, reserved = self.spend.get(account, 0), self.reserved.get(account, 0)
                rows.append({"scope": scope, "period": account[1], "limit": budget.limit, "policy": budget.policy,
                             "spent": spent / MICROS, "reserved": reserved / MICROS,
                             "used_pct": round(100.0 * spent / (budget.limit * MICROS), 2)})
        return rows

    def spend_of(self, scope: str, period: str) -> dict:
        account = (scope, period_key(period, self.clock()))
        return {"scope": scope, "period": account[1], "spent": self.spend.get(account, 0) / MICROS,
                "reserved": self.reserved.get(account, 0) / MICROS}

    def state(self) -> dict:
        return {"open_reservations": len(self.reservations), "routers": sorted(self.routers),
                "version": self.version, "keys": len(self.keys), "tenants": len(self.tenants)}

    # ---- persistence -----------------------------------------------------------------------------

    def take_flush(self) -> Flush:
        for key in self._dirty_windows:
            window = self.windows.get(key)
            if window is not None:
                self.pending.windows[key] = window.dump()
        self._dirty_windows.clear()
        flush, self.pending = self.pending, Flush()
        return flush

    def restore_flush(self, failed: Flush) -> None:
        """A write failed: keep its changes for the next one."""
        failed.merge(self.pending)
        self.pending = failed

    # ---- internals -------------------------------------------------------------------------------

    def _window(self, scope: str, kind: str, limit: int, now: float) -> SlidingWindow:
        key = (scope, kind)
        window = self.windows.get(key)
        if window is None:
            saved = self._saved_windows.pop(key, None)
            window = SlidingWindow.load(limit, saved, now) if saved else SlidingWindow(limit)
            self.windows[key] = window
        window.limit = limit  # a changed limit applies at once
        return window

    def _accounts(self, scopes: list[str], now: float) -> tuple[tuple[str, str], ...]:
        return tuple((scope, period_key(p, now)) for scope in scopes for p in PERIODS)

    def _release(self, reservation: Reservation) -> None:
        for account in reservation.accounts:
            left = self.reserved.get(account, 0) - reservation.cost
            if left > 0:
                self.reserved[account] = left
            else:
                self.reserved.pop(account, None)

    def _settle_tokens(self, reservation: Reservation, tokens: int) -> None:
        for key, entry in reservation.token_entries:
            window = self.windows.get(key)
            if window is not None:
                window.settle(entry, tokens)
                self._dirty_windows.add(key)

    def _charge(self, accounts, micros: int, now: float) -> None:
        if micros == 0:
            return
        for account in accounts:
            self.spend[account] = self.spend.get(account, 0) + micros
            self.pending.spend[account] = self.pending.spend.get(account, 0) + micros
            self._check_alerts(account, now)

    def _check_alerts(self, account: tuple[str, str], now: float) -> None:
        scope, period = account
        spec = self._spec_of(scope)
        if spec is None:
            return
        for budget in spec.budgets:
            if not period.startswith(budget.period + ":"):
                continue
            limit = int(round(budget.limit * MICROS))
            already = self.alerted.setdefault(account, set())
            for threshold in crossed(self.settings.alert_thresholds_pct, limit, self.spend.get(account, 0), already):
                already.add(threshold)
                self.pending.alerts.append((scope, period, threshold, now))
                self.alerts_out.append({"event": "budget_alert", "scope": scope, "period": period,
                                        "threshold_pct": threshold, "limit": budget.limit, "policy": budget.policy,
                                        "spent": self.spend.get(account, 0) / MICROS, "at": now})

    def _spec_of(self, scope: str) -> LimitSpec | None:
        kind, _, name = scope.partition(":")
        if kind == "tenant":
            return self.tenants.get(name)
        record = self.keys.get(name)
        return record.spec if record is not None else None

    def _usage(self, now, tenant, key_id, model, site, requests, prompt, completion, cost) -> None:
        day = period_key("day", now)[4:]
        row = self.pending.usage.setdefault((day, tenant, key_id or NO_KEY, model, site), [0, 0, 0, 0])
        row[0] += requests
        row[1] += prompt
        row[2] += completion
        row[3] += cost

    def _headers(self, scopes, now) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the tightest scope of each kind."""
        headers: dict[str, str] = {}
        for kind, attr in LIMIT_KINDS:
            tightest = None
            for scope, spec in scopes:
                limit = getattr(spec, attr)
                if limit is None:
                    continue
                window = self._window(scope, kind, limit, now)
                remaining = window.remaining(now)
                if tightest is None or remaining < tightest[1]:
                    tightest = (limit, remaining, window.reset_s(now))
            if tightest is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(tightest[0])
                headers[f"x-ratelimit-remaining-{kind}"] = str(tightest[1])
                headers[f"x-ratelimit-reset-{kind}"] = format_duration(tightest[2])
        return headers
