"""``spillway keys | tenants | usage | budgets | audit``: clients of the router's admin API (and
``spillway audit verify``, which reads the log itself: a directory or its S3 archive).

The admin key comes from the environment variable the config names (``SPILLWAY_ADMIN_KEY`` by
default), else from the file ``spillway up --local`` wrote for the local cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request

from serve_app.config import load_config
from serve_app.ops.local_cluster import DEFAULT_STATE_FILE, admin_key_path

PREFIX = "/v1/spillway/admin"
CLASSES = ["public", "internal", "confidential", "restricted"]
TIMEOUT_S = 60


class AdminError(Exception):
    pass


def _call(args, method: str, path: str, body: dict | None = None) -> dict:
    config = load_config(args.config)
    key = os.environ.get(config.governance.admin_key_env)
    if not key:
        path_file = admin_key_path(DEFAULT_STATE_FILE.parent)
        if not path_file.exists():
            raise AdminError(f"no admin key: set ${config.governance.admin_key_env} (or start the local cluster, "
                             f"which writes {path_file})")
        key = path_file.read_text().strip()
    url = (args.url or f"http://{config.http.host}:{config.http.port}").rstrip("/") + PREFIX + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise AdminError(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise AdminError(f"cannot reach {url}: {exc.reason}") from None


def _rules(args) -> dict:
    rules: dict = {}
    for name in ("rpm", "tpm"):
        if getattr(args, name) is not None:
            rules[name] = getattr(args, name)
    if args.residency:
        rules["residency"] = args.residency
    if getattr(args, "audit_text_up_to", None):
        rules["audit_text_up_to"] = args.audit_text_up_to
    if getattr(args, "pii_policy", None):
        rules["pii_policy"] = args.pii_policy
    budgets = []
    for text in args.budget or ():
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise AdminError(f"--budget {text!r}: PERIOD:AMOUNT[:POLICY], e.g. month:500:onprem_only")
        budget = {"period": parts[0], "limit": float(parts[1])}
        if len(parts) == 3:
            budget["policy"] = parts[2]
        budgets.append(budget)
    if budgets:
        rules["budgets"] = budgets
    return rules


def _print(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def cmd_keys(args) -> int:
    if args.keys_command == "create":
        spec = {"tenant": args.tenant, "name": args.name or "", "tier": args.tier, **_rules(args)}
        if args.models:
            spec["models"] = [m for m in args.models.split(",") if m]
        if args.data_class:
            spec["data_class"] = args.data_class
        created = _call(args, "POST", "/keys", spec)
        print(json.dumps(created, indent=2) if args.json else
              f"key {created['id']} for tenant {created['tenant']} (shown once; store it now):\n{created['key']}")
    elif args.keys_command == "list":
        rows = _call(args, "GET", "/keys")["data"]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print(rows, ["id", "tenant", "name", "tier", "models", "residency", "rpm", "tpm", "active"])
    elif args.keys_command == "rotate":
        created = _call(args, "POST", f"/keys/{args.key_id}/rotate")
        print(f"key {created['id']} replaces {args.key_id} (revoked now); shown once:\n{created['key']}")
    else:
        _call(args, "DELETE", f"/keys/{args.key_id}")
        print(f"key {args.key_id} revoked")
    return 0


def cmd_tenants(args) -> int:
    if args.tenants_command == "set":
        print(json.dumps(_call(args, "PUT", f"/tenants/{args.name}", _rules(args)), indent=2))
    else:
        rows = _call(args, "GET", "/tenants")["data"]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print(rows, ["name", "rpm", "tpm", "residency", "budgets"])
    return 0


def cmd_usage(args) -> int:
    query = f"?period={args.period}&by={args.by}" + (f"&date={args.date}" if args.date else "")
    report = _call(args, "GET", "/usage" + query)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"usage {report['from']} .. {report['to']} by {', '.join(report['by']) or 'nothing'}")
        _print(report["data"], [*report["by"], "requests", "prompt_tokens", "completion_tokens", "cost"])
    return 0


def cmd_budgets(args) -> int:
    rows = _call(args, "GET", "/budgets")["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print(rows, ["scope", "period", "limit", "spent", "reserved", "used_pct", "policy"])
    return 0


def cmd_audit(args) -> int:
    if args.audit_command == "verify":
        return audit_verify(args)
    if args.audit_command == "rotate":
        print(json.dumps(_call(args, "POST", "/audit/rotate"), indent=2))
        return 0
    rows = _call(args, "GET", f"/audit?limit={args.limit}")["data"]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print(rows, ["seq", "request_id", "tenant", "key_id", "variant", "data_class", "site", "status",
                      "prompt_tokens", "completion_tokens", "cost"])
    return 0


def audit_verify(args) -> int:
    """Exit 0 when the log verifies, 1 when it does not (each problem printed)."""
    import tempfile
    from pathlib import Path

    from serve_app.governance import audit

    public = audit.load_public_key(Path(args.public_key)) if args.public_key else None
    if args.s3:
        bucket, _, prefix = args.s3.removeprefix("s3://").partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                count = audit.Archiver(bucket, prefix, args.endpoint_url).download(Path(tmp))
            except ValueError as exc:
                print(f"audit archive FAILED: {exc}")
                return 1
            print(f"downloaded {count} object(s) from {args.s3} (each checked against its SHA-256)")
            report = audit.verify(Path(tmp), public, require_closed=True)
    else:
        directory = Path(args.dir).expanduser() if args.dir else load_config(args.config).governance.audit_dir()
        report = audit.verify(directory, public)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_rollout(args) -> int:
    if args.rollout_command == "start":
        body = {"alias": args.alias, "stable": args.stable, "canary": args.canary,
                "steps": [float(s) for s in args.steps.split(",") if s], "step_s": args.step_s,
                "min_requests": args.min_requests, "max_error_rate_delta": args.max_error_rate_delta,
                "max_ttft_ratio": args.max_ttft_ratio}
        if args.max_step_s is not None:
            body["max_step_s"] = args.max_step_s
        answers = [_call(args, "POST", "/rollouts", body)]
    elif args.rollout_command == "abort":
        answers = [_call(args, "POST", f"/rollouts/{args.alias}/abort")]
    else:
        answers = _call(args, "GET", "/rollouts")["data"]
    if args.json:
        print(json.dumps(answers, indent=2))
        return 0
    _print([{"alias": a["alias"], "stable": a["stable"], "canary": a["canary"], "state": a["state"],
             "canary %": a["canary_percent"], "step": f"{a['step']}/{len(a['steps'])}", "reason": a["reason"]}
            for a in answers], ["alias", "stable", "canary", "state", "canary %", "step", "reason"])
    return 0


def add_parsers(sub, with_config) -> None:
    def admin(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--url", help="the router's URL (default: the config's http host and port)")
        p.add_argument("--json", action="store_true")
        return p

    def rules(p: argparse.ArgumentParser, tenant: bool = False) -> None:
        p.add_argument("--rpm", type=int, help="requests per minute")
        p.add_argument("--tpm", type=int, help="tokens per minute")
        p.add_argument("--budget", action="append", help="PERIOD:AMOUNT[:refuse|onprem_only], e.g. month:500; "
                       "repeatable (one per period)")
        p.add_argument("--residency", choices=["any", "onprem"], help="onprem: never leaves on-prem sites")
        if tenant:
            p.add_argument("--pii-policy", choices=["pin", "redact"],
                           help="internal requests holding PII: pin on-prem (default) or redact and let them spill")
            p.add_argument("--audit-text-up-to", choices=CLASSES,
                           help="keep request and answer text in the audit log for this data class and lower")

    keys = sub.add_parser("keys", help="API keys: create, list, rotate, revoke (admin API)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = admin(keys_sub.add_parser("create", help="a new key (printed once)"))
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    create.add_argument("--tier", type=int, default=0, help="admission priority, -10..10")
    create.add_argument("--models", help="comma-separated models or aliases it may use (default: all)")
    create.add_argument("--data-class", choices=CLASSES,
                        help="its requests' default data class")
    rules(create)
    admin(keys_sub.add_parser("list", help="keys (never their secrets)"))
    for verb, text in (("rotate", "a new key with the same rules; the old one is revoked"), ("revoke", "revoke")):
        p = admin(keys_sub.add_parser(verb, help=text))
        p.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)

    tenants = sub.add_parser("tenants", help="tenants' limits, budgets and residency (admin API)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    tenant_set = admin(tenants_sub.add_parser("set", help="create or replace a tenant's rules"))
    tenant_set.add_argument("name")
    rules(tenant_set, tenant=True)
    admin(tenants_sub.add_parser("list"))
    tenants.set_defaults(func=cmd_tenants)

    usage = admin(sub.add_parser("usage", help="requests, tokens and cost per tenant, key, model, site"))
    usage.add_argument("--period", choices=["day", "month"], default="day")
    usage.add_argument("--date", help="YYYY-MM-DD (day) or YYYY-MM (month); default: now (UTC)")
    usage.add_argument("--by", default="tenant", help="comma-separated: tenant, key_id, model, site")
    usage.set_defaults(func=cmd_usage)

    budgets = admin(sub.add_parser("budgets", help="spend against budget, per tenant and key"))
    budgets.set_defaults(func=cmd_budgets)

    audit = sub.add_parser("audit", help="the audit log: verify its chain and signatures, show, rotate")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = with_config(audit_sub.add_parser("verify", help="check a log directory or its S3 archive; exit 1 "
                                              "on any edited, removed, reordered or cut-off record"))
    verify.add_argument("--dir", help="the log directory (default: the config's governance.audit.dir)")
    verify.add_argument("--s3", help="s3://bucket/prefix of an archive, instead of a directory")
    verify.add_argument("--endpoint-url", help="an S3-compatible server's URL (with --s3)")
    verify.add_argument("--public-key", help="the Ed25519 public key (PEM) that must have signed the "
                        "checkpoints (default: the one stored with the log; pass your own copy)")
    tail = admin(audit_sub.add_parser("tail", help="the latest records (admin API)"))
    tail.add_argument("-n", "--limit", type=int, default=20)
    admin(audit_sub.add_parser("rotate", help="close the open segment now and archive it (admin API)"))
    audit.set_defaults(func=cmd_audit)

    rollout = sub.add_parser("rollout", help="progressive rollouts: raise a canary's share in steps, roll back on "
                             "errors or slow TTFT (admin API)")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True)
    start = admin(rollout_sub.add_parser("start", help="start raising CANARY's share of ALIAS"))
    start.add_argument("--alias", required=True, help="the model name clients send")
    start.add_argument("--stable", required=True, help="the model serving the alias now")
    start.add_argument("--canary", required=True, help="the model to roll out")
    start.add_argument("--steps", default="5,25,50,100", help="canary percentages, ending at 100")
    start.add_argument("--step-s", type=float, default=60.0, help="shortest time per step")
    start.add_argument("--max-step-s", type=float, help="longest wait for enough traffic per step (default 5 x step)")
    start.add_argument("--min-requests", type=int, default=20, help="requests per variant before a step is judged")
    start.add_argument("--max-error-rate-delta", type=float, default=0.02, help="canary 5xx rate over stable's")
    start.add_argument("--max-ttft-ratio", type=float, default=1.5, help="canary mean TTFT / stable's")
    admin(rollout_sub.add_parser("status", help="every rollout: state, share, the last step's figures"))
    abort = admin(rollout_sub.add_parser("abort", help="stop a rollout and send the alias back to stable"))
    abort.add_argument("alias")
    rollout.set_defaults(func=cmd_rollout)
