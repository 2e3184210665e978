"""Keys, limits and budgets on the real request path without Ray: the real ASGI app, gateway,
stages and outcome sink, the real ledger service (SQLite), in front of FAKE engines on real
engine ports. The ledger's Serve handle is replaced by a FAKE that awaits the service in-process."""

from __future__ import annotations

import asyncio
import json

import pytest
from types import SimpleNamespace

from serve_app.config import SpillwayConfig
from serve_app.governance.service import LedgerService
from tests.test_request_path import MODEL, Cluster, Exchange, StalledExchange, chat, config, engines, run, wait_for
from tests.test_engine_port import FakeEngine


class InProcessLedger:
    """A FAKE Serve handle: ``handle.method.remote(*args)`` awaits the real service's method."""

    def __init__(self, service: LedgerService):
        self.service = service

    def __getattr__(self, name):
        method = getattr(self.service, name)
        return SimpleNamespace(remote=lambda *args: method(*args))


def governed(tmp_path, governance: dict | None = None, **router) -> tuple[SpillwayConfig, InProcessLedger]:
    raw = config().model_dump(mode="json")
    raw["governance"] = {"store": {"path": str(tmp_path / "ledger.sqlite3")}, "settle_batch_ms": 5, **(governance or {})}
    raw["router"].update(router)
    for site, price in zip(raw["sites"], (0.001, 0.004)):  # on-prem, cloud: per 1,000 tokens
        site["cost_per_1k_tokens"] = price
    cfg = SpillwayConfig.model_validate(raw)
    return cfg, InProcessLedger(LedgerService(cfg.model_dump(mode="json")))


def bearer(key: dict) -> dict:
    return {"authorization": f"Bearer {key['key']}"}


def test_open_without_keys_then_every_request_needs_an_active_key(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            open_answer = await Exchange(chat()).run(cluster.app)
            mode = cluster.gateway.auth_mode()
            key = await ledger.service.create_key({"tenant": "acme"})
            # The ledger's version moved: this router's next sync (at most heartbeat_s away) re-reads
            # the table and is no longer open.
            assert await wait_for(lambda: not cluster.gateway.ledger.table.open, timeout_s=10)
            results = {
                "none": await Exchange(chat()).run(cluster.app),
                "made-up": await Exchange(chat(), headers={"authorization": "Bearer sk-nope"}).run(cluster.app),
                "good": await Exchange(chat(), headers=bearer(key)).run(cluster.app),
            }
            await ledger.service.revoke_key(key["id"])
            results["revoked"] = await Exchange(chat(), headers=bearer(key)).run(cluster.app)
            return open_answer, mode, results, cluster.gateway.auth_mode()

    open_answer, mode, results, keyed_mode = run(main())
    assert open_answer.status == 200 and mode["mode"] == "open" and "anyone" in mode["warning"]
    assert keyed_mode == {"mode": "keys"}
    assert results["good"].status == 200
    for name in ("none", "made-up", "revoked"):
        error = json.loads(results[name].body)["error"]
        assert results[name].status == 401 and error["code"] == "invalid_api_key", name


def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(tmp_path):
    """The key is checked on the request's head: a keyless client cannot make a router read (and
    scan) a body, nor hold a request slot by trickling one for ``body_timeout_s``."""
    cfg, ledger = governed(tmp_path, body_timeout_s=60)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            assert (await Exchange(chat()).run(cluster.app)).status == 200  # (open: the table is read)
            key = await ledger.service.create_key({"tenant": "acme"})
            assert await wait_for(lambda: not cluster.gateway.ledger.table.open, timeout_s=10)
            answers = [await asyncio.wait_for(StalledExchange(chat(), headers=headers).run(cluster.app), 10)
                       for headers in ({}, {"authorization": "Bearer sk-nope"})]
            # A key it knows: the router goes on to read the body, and waits for the rest of it.
            exchange = StalledExchange(chat(), headers=bearer(key))
            stalled = asyncio.create_task(exchange.run(cluster.app))
            reading = await wait_for(lambda: exchange._body_read)
            waiting = not stalled.done() and exchange.sent == []
            stalled.cancel()
            return answers, [a._body_read for a in answers], reading and waiting

    answers, bodies_read, waited_for_the_body = run(main())
    assert [a.status for a in answers] == [401, 401] and bodies_read == [False, False] and waited_for_the_body
    assert all(json.loads(a.body)["error"]["code"] == "invalid_api_key" for a in answers)


def test_a_model_outside_the_keys_list_is_403_and_on_prem_residency_needs_an_on_prem_model(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            other = await ledger.service.create_key({"tenant": "acme", "models": ["another-model"]})
            onprem = await ledger.service.create_key({"tenant": "acme", "residency": "onprem"})
            return (await Exchange(chat(), headers=bearer(other)).run(cluster.app),
                    await Exchange(chat(), headers=bearer(onprem)).run(cluster.app))

    forbidden, onprem = run(main())
    assert forbidden.status == 403 and json.loads(forbidden.body)["error"]["code"] == "model_not_allowed"
    assert onprem.status == 200 and onprem.response_headers["x-spillway-site"] == "onprem"


def test_limits_answer_with_openai_headers_and_429_with_retry_after(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"rpm": 2, "tpm": 10_000})
            key = await ledger.service.create_key({"tenant": "acme"})
            return [await Exchange(chat(max_tokens=5), headers=bearer(key)).run(cluster.app) for _ in range(3)]

    first, second, third = run(main())
    assert first.response_headers["x-ratelimit-remaining-requests"] == "1"
    assert second.response_headers["x-ratelimit-remaining-requests"] == "0"
    assert int(first.response_headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert first.response_headers["x-ratelimit-limit-tokens"] == "10000"
    assert third.status == 429 and json.loads(third.body)["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.response_headers["retry-after"]) <= 60
    assert third.response_headers["x-ratelimit-remaining-requests"] == "0"


def test_a_spent_budget_refuses_with_insufficient_quota(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"budgets": [{"period": "day", "limit": 1e-9}]})
            key = await ledger.service.create_key({"tenant": "acme"})
            return await Exchange(chat(max_tokens=5), headers=bearer(key)).run(cluster.app)

    refused = run(main())
    assert refused.status == 429
    assert json.loads(refused.body)["error"]["type"] == "insufficient_quota"


def test_a_max_tokens_past_the_context_is_estimated_at_the_context(tmp_path):
    """The engine clamps max_tokens to what the context leaves, so the estimate does too: a budget
    that holds a full context admits max_tokens=10**9 (estimated at 10**9 tokens it was refused),
    and a 10**9-token TPM limit is not needed for it either."""
    cfg, ledger = governed(tmp_path)
    context = cfg.model(MODEL).engine.max_model_len
    full_context_cost = context / 1000 * 0.004  # the dearer site's price per 1,000 tokens

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"budgets": [{"period": "day", "limit": 2 * full_context_cost}],
                                                      "tpm": 2 * context})
            key = await ledger.service.create_key({"tenant": "acme"})
            huge = await Exchange(chat(max_tokens=10**9), headers=bearer(key)).run(cluster.app)
            negative = await Exchange(chat(max_tokens=-10**9), headers=bearer(key)).run(cluster.app)
            return huge, negative

    huge, negative = run(main())
    assert huge.status == 200, huge.body
    assert negative.status == 400 and json.loads(negative.body)["error"]["param"] == "max_tokens"


def test_every_exit_settles_its_reservation_and_records_usage(tmp_path):
    """Finished, streamed, and the client gone mid-stream: no reservation is left open."""
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            key = await ledger.service.create_key({"tenant": "acme"})
            await Exchange(chat(max_tokens=5), headers=bearer(key)).run(cluster.app)
            await Exchange(chat(stream=True, max_tokens=5), headers=bearer(key)).run(cluster.app)
            await Exchange(chat(stream=True), headers=bearer(key), disconnect_after_chunks=2).run(cluster.app)
            settled = await wait_for(lambda: not ledger.service.ledger.reservations and
                                     not cluster.gateway.ledger._pending)
            usage = await ledger.service.usage("0000-00-00", "9999-12-31", ["tenant", "key_id"])
            return settled, usage, key

    settled, usage, key = run(main())
    assert settled
    assert len(usage) == 1 and usage[0]["tenant"] == "acme" and usage[0]["key_id"] == key["id"]
    assert usage[0]["requests"] == 3 and usage[0]["completion_tokens"] > 0


def test_a_burst_with_a_key_this_router_has_not_seen_yet_is_served_whole(tmp_path):
    """The first requests with a new key share one re-read of the key table; none is refused."""
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            await Exchange(chat(max_tokens=1)).run(cluster.app)  # the router has read its (empty) table
            await ledger.service.create_key({"tenant": "old"})
            await cluster.gateway.ledger.refresh()
            key = await ledger.service.create_key({"tenant": "acme"})  # unknown to the router
            return await asyncio.gather(*[Exchange(chat(max_tokens=1), headers=bearer(key)).run(cluster.app)
                                          for _ in range(24)])

    assert [a.status for a in run(main())] == [200] * 24


def test_the_first_keys_requests_are_not_served_open_by_a_replica_that_has_not_heard_of_it(tmp_path):
    """The router read an empty table (open); a key is made and used before its next sync: the
    requests with the key are governed by it (its rpm holds), not served open."""
    cfg, ledger = governed(tmp_path, {"heartbeat_s": 60, "keys_refresh_s": 60})  # no sync during the test

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            assert (await cluster.gateway.ledger.ready()).open  # read, and nothing queued to sync
            key = await ledger.service.create_key({"tenant": "acme", "rpm": 3})
            answers = await asyncio.gather(*[Exchange(chat(max_tokens=1), headers=bearer(key)).run(cluster.app)
                                             for _ in range(6)])
            keyless = await Exchange(chat(max_tokens=1)).run(cluster.app)
            return answers, keyless

    answers, keyless = run(main())
    assert sorted(a.status for a in answers) == [200] * 3 + [429] * 3
    assert keyless.status == 401  # the re-read ended open mode on this replica


def test_keys_refresh_s_bounds_how_long_a_replica_stays_open_after_the_first_key(tmp_path):
    cfg, ledger = governed(tmp_path, {"heartbeat_s": 60, "keys_refresh_s": 0.1})

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            assert (await cluster.gateway.ledger.ready()).open  # read, and nothing queued to sync
            await ledger.service.create_key({"tenant": "acme"})
            return await wait_for(lambda: not cluster.gateway.ledger.table.open, timeout_s=10)

    assert run(main())


def test_budget_alerts_reach_the_webhook_once_per_threshold(tmp_path):
    """A real HTTP server on loopback stands for the operator's webhook."""
    from aiohttp import web

    from serve_app.governance.budgets import MICROS
    from serve_app.governance.messages import Settlement

    async def main():
        received: list[dict] = []

        async def hook(request):
            received.append(await request.json())
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        raw = config().model_dump(mode="json")
        raw["governance"] = {"store": {"path": str(tmp_path / "ledger.sqlite3")},
                             "alert_webhook_url": f"http://127.0.0.1:{port}/hook"}
        service = LedgerService(raw)
        await service.set_tenant("acme", {"budgets": [{"period": "month", "limit": 1.0}]})
        for cost in (0.4, 0.2, 0.5):  # 40 %, 60 % (50 fires), 110 % (80 and 100 fire)
            await service.sync("r1", [Settlement("r1", None, None, "acme", MODEL, "onprem", 1, 1, int(cost * MICROS))])
        await wait_for(lambda: len(received) >= 3)
        await runner.cleanup()
        return received

    received = run(main())
    assert [(a["scope"], a["threshold_pct"]) for a in received] == [("tenant:acme", 50), ("tenant:acme", 80),
                                                                   ("tenant:acme", 100)]
    assert received[-1]["spent"] == 1.1 and received[-1]["event"] == "budget_alert"


def test_the_admin_api_needs_the_admin_key_and_works_as_a_fresh_routers_first_call(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            cluster.gateway.admin_key = "adm-" + "k" * 20
            path = "/v1/spillway/admin/keys"
            body = {"tenant": "acme", "rpm": 5}
            wrong = await Exchange(body, path=path, headers={"authorization": "Bearer nope"}).run(cluster.app)
            created = await Exchange(body, path=path, headers={"authorization": f"Bearer {cluster.gateway.admin_key}"}
                                     ).run(cluster.app)
            bad = await Exchange({"tenant": "acme", "rpm": -1}, path=path,
                                 headers={"authorization": f"Bearer {cluster.gateway.admin_key}"}).run(cluster.app)
            key = json.loads(created.body)
            served = await Exchange(chat(max_tokens=1), headers=bearer(key)).run(cluster.app)
            return wrong, created, bad, key, served

    wrong, created, bad, key, served = run(main())
    assert wrong.status == 401 and created.status == 201 and key["rpm"] == 5 and key["key"].startswith("sk-spw-")
    assert bad.status == 400 and json.loads(bad.body)["error"]["param"] == "rpm"
    assert served.status == 200 and served.response_headers["x-ratelimit-limit-requests"] == "5"


def test_the_admin_apis_queries_are_400_when_malformed_never_500(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            cluster.gateway.admin_key = "adm-" + "k" * 20
            admin = {"authorization": f"Bearer {cluster.gateway.admin_key}"}

            async def get(path, query):
                return await Exchange(b"", path="/v1/spillway/admin" + path, headers=admin, method="GET",
                                      query=query).run(cluster.app)

            bad = [await get("/audit", q) for q in ("limit=%C2%B2", "limit=" + "9" * 5000, "limit=0", "limit=-1")]
            bad += [await get("/usage", q) for q in ("period=day&date=9999-99-99", "period=month&date=2026-13")]
            repeated = await get("/usage", "by=" + ",".join(["tenant"] * 5000))
            good = await get("/audit", "limit=7")
            return bad, repeated, good

    bad, repeated, good = run(main())
    assert [b.status for b in bad] == [400] * len(bad), [b.body for b in bad]
    assert repeated.status == 200 and json.loads(repeated.body)["by"] == ["tenant"]
    assert good.status == 200


def test_every_request_gets_an_audit_record_with_text_only_where_its_tenant_allows(tmp_path):
    """Records of answered, refused and streamed requests; the tenant that opted in up to
    ``internal`` gets text for an internal request, none for a confidential one (an e-mail
    address raises it); another tenant never gets text. The log verifies."""
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"audit_text_up_to": "internal"})
            acme = await ledger.service.create_key({"tenant": "acme"})
            other = await ledger.service.create_key({"tenant": "other"})
            secret = chat(messages=[{"role": "user", "content": "mail jane.doe@example.com the plan"}])
            for exchange in (
                Exchange(chat(), headers={**bearer(acme), "x-request-id": "r-internal",
                                          "x-data-classification": "internal"}),
                Exchange(chat(stream=True), headers={**bearer(acme), "x-request-id": "r-stream"}),
                Exchange(secret, headers={**bearer(acme), "x-request-id": "r-confidential"}),
                Exchange(chat(), headers={**bearer(other), "x-request-id": "r-other"}),
                Exchange(chat(), headers={"authorization": "Bearer sk-made-up", "x-request-id": "r-refused"}),
            ):
                await exchange.run(cluster.app)
            await cluster.gateway.ledger.sync()
            return {r["request_id"]: r for r in await ledger.service.audit_tail(100)}

    records = run(main())
    assert set(records) == {"r-internal", "r-stream", "r-confidential", "r-other", "r-refused"}
    internal = records["r-internal"]
    assert internal["tenant"] == "acme" and internal["site"] == "onprem" and internal["status"] == 200
    assert internal["data_class"] == "internal" and internal["prompt_tokens"] > 0 and internal["cost"] > 0
    assert internal["replica"] and internal["queue_ms"] is not None and internal["router"]
    assert '"hi"' in internal["text"]["request"] and internal["text"]["response"]
    assert "data: " in records["r-stream"]["text"]["response"]  # the stream as the client got it
    confidential = records["r-confidential"]
    assert confidential["data_class"] == "confidential" and "email" in confidential["detectors"]
    assert "text" not in confidential
    assert "text" not in records["r-other"]
    assert records["r-refused"]["status"] == 401 and records["r-refused"]["site"] is None
    assert all("jane.doe" not in json.dumps(r) for r in records.values())
    from serve_app.governance import audit

    report = audit.verify(cfg.governance.audit_dir())
    assert report.ok and report.records == 5, report.lines()


def test_deterministic_answers_are_cached_per_tenant_free_and_audited_as_hits(tmp_path):
    """temperature 0: the second identical request is a hit (no engine call, no cost, the same
    answer, as a stream when streamed); another tenant's identical request misses; a sampled
    request is never cached; the audit log says hit and miss."""
    cfg, ledger = governed(tmp_path)
    fleet = engines()

    async def main():
        async with Cluster(fleet, cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"budgets": [{"period": "day", "limit": 100.0}]})
            acme = await ledger.service.create_key({"tenant": "acme"})
            other = await ledger.service.create_key({"tenant": "other"})

            async def ask(key, body, request_id):
                return await Exchange(body, headers={**bearer(key), "x-request-id": request_id}).run(cluster.app)

            exact = chat(temperature=0, max_tokens=5)
            first = await ask(acme, exact, "c-1")
            calls_after_first = sum(len(e.calls) for e in fleet.values())
            second = await ask(acme, exact, "c-2")
            calls_after_hit = sum(len(e.calls) for e in fleet.values())
            streamed = [await ask(acme, chat(stream=True, seed=7, max_tokens=5), f"s-{i}") for i in range(2)]
            elsewhere = await ask(other, exact, "c-other")
            sampled = [await ask(acme, chat(temperature=0.8), f"t-{i}") for i in range(2)]
            await cluster.gateway.ledger.sync()
            records = {r["request_id"]: r for r in await ledger.service.audit_tail(100)}
            spend = await ledger.service.spend("tenant:acme", "day")
            return first, second, calls_after_first, calls_after_hit, streamed, elsewhere, sampled, records, spend

    first, second, calls_first, calls_hit, streamed, elsewhere, sampled, records, spend = run(main())
    assert first.response_headers["x-spillway-cache"] == "miss" and first.status == 200
    assert second.response_headers["x-spillway-cache"] == "hit" and second.status == 200
    assert second.response_headers["x-spillway-site"] == "cache"
    assert calls_hit == calls_first  # no engine saw the hit
    assert second.body == first.body
    assert [s.response_headers["x-spillway-cache"] for s in streamed] == ["miss", "hit"]
    assert streamed[1].response_headers["content-type"].startswith("text/event-stream")
    assert streamed[1].body == streamed[0].body and streamed[1].body.endswith(b"data: [DONE]\n\n")
    assert elsewhere.response_headers["x-spillway-cache"] == "miss"  # never across tenants
    assert all("x-spillway-cache" not in s.response_headers for s in sampled)
    assert records["c-1"]["cache"] == "miss" and records["c-1"]["cost"] > 0
    assert records["c-2"]["cache"] == "hit" and records["c-2"]["cost"] == 0 and records["c-2"]["site"] == "cache"
    assert records["s-1"]["cache"] == "hit" and records["t-0"]["cache"] is None
    # Spend: the misses and the sampled requests cost; the hits added nothing.
    paid = sum(r["cost"] for r in records.values() if r["tenant"] == "acme")
    assert spend["spent"] == pytest.approx(paid) and spend["reserved"] == 0


def test_a_router_on_a_cloud_site_caches_no_confidential_answer(tmp_path):
    cfg, ledger = governed(tmp_path)
    raw = cfg.model_dump(mode="json")
    raw["router"]["site"] = "cloud"
    cloud_cfg = SpillwayConfig.model_validate(raw)

    async def main():
        async with Cluster(engines(), cloud_cfg, ledger=ledger) as cluster:
            headers = {"x-data-classification": "confidential"}
            answers = [await Exchange(chat(temperature=0), headers=headers).run(cluster.app) for _ in range(2)]
            public = [await Exchange(chat(temperature=0)).run(cluster.app) for _ in range(2)]
            return answers, public, cluster.gateway.cache.cache.report()

    answers, public, report = run(main())
    assert all("x-spillway-cache" not in a.response_headers for a in answers)
    assert [p.response_headers["x-spillway-cache"] for p in public] == ["miss", "hit"]
    assert report["entries"] == 1


def test_redaction_sends_pii_to_the_cloud_only_as_placeholders_and_restores_it_across_chunks(tmp_path):
    """The model runs only in the cloud. A tenant with pii_policy=redact gets its internal request
    with an e-mail and a phone number served there: the cloud engine receives placeholders only;
    the client gets the values back, also when a placeholder arrives split across stream chunks.
    Another tenant's identical request stays pinned (no on-prem site: refused). No value reaches
    the audit log."""
    raw = config(onprem_replicas=0).model_dump(mode="json")
    raw["governance"] = {"store": {"path": str(tmp_path / "ledger.sqlite3")}, "settle_batch_ms": 5}
    cfg = SpillwayConfig.model_validate(raw)
    ledger = InProcessLedger(LedgerService(cfg.model_dump(mode="json")))
    email, phone = "jane.doe@example.com", "+41 44 668 18 00"
    split = ['data: {"id":"x","choices":[{"index":0,"delta":{"content":"Writing to [PII_EM"}}]}\n\n',
             'data: {"id":"x","choices":[{"index":0,"delta":{"content":"AIL_1] and [PII_PHONE_1"}}]}\n\n',
             'data: {"id":"x","choices":[{"index":0,"delta":{"content":"]."}}]}\n\n']
    cloud = FakeEngine(first=split, tokens=0, delay_s=0.01)
    prompt = [{"role": "user", "content": f"Mail {email}, or call {phone}; {email} again."}]

    async def main():
        async with Cluster({"cloud-0": cloud}, cfg, ledger=ledger) as cluster:
            await ledger.service.set_tenant("acme", {"pii_policy": "redact", "audit_text_up_to": "internal"})
            acme = await ledger.service.create_key({"tenant": "acme"})
            other = await ledger.service.create_key({"tenant": "other"})
            internal = {"x-data-classification": "internal"}
            plain = await Exchange(chat(messages=prompt), headers={**bearer(acme), **internal,
                                                                   "x-request-id": "red-1"}).run(cluster.app)
            streamed = await Exchange(chat(messages=prompt, stream=True),
                                      headers={**bearer(acme), **internal, "x-request-id": "red-2"}).run(cluster.app)
            pinned = await Exchange(chat(messages=prompt), headers={**bearer(other), **internal}).run(cluster.app)
            await cluster.gateway.ledger.sync()
            return plain, streamed, pinned, list(cloud.calls), await ledger.service.audit_tail(100)

    plain, streamed, pinned, calls, records = run(main())
    sent = json.dumps([fields for _, fields, _ in calls])
    assert email not in sent and phone not in sent
    assert calls[0][1]["messages"][0]["content"] == "Mail [PII_EMAIL_1], or call [PII_PHONE_1]; [PII_EMAIL_1] again."
    assert plain.status == 200 and plain.response_headers["x-spillway-site"] == "cloud"
    assert plain.response_headers["x-spillway-redacted"] == "2"
    assert json.loads(plain.body)["echo"] == prompt  # the engine echoed placeholders; the client sees values
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in streamed.body.decode().split("\n\n") if line.startswith("data: {") and '"choices":[{' in line)
    assert text == f"Writing to {email} and {phone}."
    assert pinned.status == 503
    assert all(email not in json.dumps(r) and phone not in json.dumps(r) for r in records)
    assert {r["request_id"]: r["redacted"] for r in records if r["request_id"].startswith("red-")} == \
        {"red-1": 2, "red-2": 2}


def test_the_console_page_is_static_and_its_data_needs_the_admin_key(tmp_path):
    cfg, ledger = governed(tmp_path)

    async def main():
        async with Cluster(engines(), cfg, ledger=ledger) as cluster:
            cluster.gateway.admin_key = "adm-" + "k" * 20
            key = await ledger.service.create_key({"tenant": "acme"})
            await Exchange(chat(), headers=bearer(key)).run(cluster.app)
            await cluster.gateway.ledger.sync()

            async def fetch(path, headers=None):
                exchange = Exchange(b"", path=path)
                scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                         "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
                         "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                         "server": ("127.0.0.1", 80),
                         "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}
                await cluster.app(scope, exchange.receive, exchange.send)
                return exchange

            page = await fetch("/v1/spillway/console")
            script = await fetch("/v1/spillway/console.js")
            refused = await fetch("/v1/spillway/admin/console/data")
            data = await fetch("/v1/spillway/admin/console/data", {"authorization": "Bearer adm-" + "k" * 20})
            return page, script, refused, data

    page, script, refused, data = run(main())
    assert page.status == 200 and b"<table id=\"budgets\">" in page.body
    assert "script-src 'self'" in page.response_headers["content-security-policy"]
    assert script.status == 200 and b"textContent" in script.body and b"innerHTML" not in script.body
    assert refused.status == 401
    report = json.loads(data.body)
    assert set(report) >= {"health", "scheduler", "budgets", "usage", "audit", "router_replica"}
    assert report["usage"]["by"] == ["site"] and report["usage"]["data"][0]["site"] == "onprem"
    assert report["audit"][-1]["tenant"] == "acme" and MODEL in report["scheduler"]["models"]
