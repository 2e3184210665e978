"""The audit log of a real run: requests through both router replicas of the real cluster, the
log written by the real ledger, rotated and archived to a real S3-compatible server (moto on
loopback), then checked with the real ``spillway audit verify`` command: whole, from the archive,
and with each kind of tampering on a copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serve_app.governance import audit
from tests.conftest import E2E_AUDIT_PREFIX, E2E_TENANT, admin_headers, e2e_key_id

pytestmark = pytest.mark.e2e


def spillway(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("spillway")), *argv], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())


def test_a_real_runs_audit_log_verifies_from_disk_and_s3_and_each_tampering_is_caught(
        e2e_cluster, client, s3_server, tmp_path):
    config, config_path, base_url = e2e_cluster
    ids = [f"audit-e2e-{i}" for i in range(6)]
    for i, request_id in enumerate(ids):
        kwargs = {"stream": True} if i % 2 else {}
        answer = client.chat.completions.create(
            model="spillway-dense", messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=3,
            extra_headers={"x-request-id": request_id}, **kwargs)
        if kwargs:
            list(answer)
    admin = f"{base_url}/v1/spillway/admin"

    def ours() -> dict:
        rows = httpx.get(f"{admin}/audit", params={"limit": 1000}, headers=admin_headers(), timeout=60).json()["data"]
        return {r["request_id"]: r for r in rows if r["request_id"] in ids}

    import time
    deadline = time.monotonic() + 30
    while len(records := ours()) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.2)  # the routers' settlement batches are on their way
    assert set(records) == set(ids)
    for record in records.values():
        assert record["tenant"] == E2E_TENANT and record["key_id"] == e2e_key_id()
        assert record["site"] in ("onprem", "cloud") and record["replica"] and record["status"] == 200
        assert record["completion_tokens"] >= 1 and record["cost"] > 0 and "text" not in record
    assert len({r["router"] for r in httpx.get(f"{admin}/audit", params={"limit": 1000}, headers=admin_headers(),
                                               timeout=60).json()["data"]}) >= 2  # several replicas, one chain
    # (>= : router replicas killed by other tests' runs on this cluster left their records too)

    rotated = httpx.post(f"{admin}/audit/rotate", headers=admin_headers(), timeout=120).json()
    assert rotated["closed"] and rotated["last_seq"] >= len(ids)

    directory = config.governance.audit_dir()
    result = spillway("audit", "verify", "--config", str(config_path))
    assert result.returncode == 0 and "audit log OK" in result.stdout, result.stdout + result.stderr

    endpoint, bucket = s3_server
    result = spillway("audit", "verify", "--s3", f"s3://{bucket}/{E2E_AUDIT_PREFIX}", "--endpoint-url", endpoint)
    assert result.returncode == 0 and "audit log OK" in result.stdout, result.stdout + result.stderr

    # Tamper with copies of the real log's closed segments, one kind at a time.
    closed = [path for _, path in audit.segment_files(directory)
              if (audit.read_head(audit.head_path(path)) or {}).get("closed")]
    assert closed

    def copy() -> tuple[Path, Path]:
        target = Path(tmp_path) / f"copy-{len(list(Path(tmp_path).iterdir()))}"
        target.mkdir()
        shutil.copy(directory / audit.PUBLIC_KEY_FILE, target)
        for path in closed:
            shutil.copy(path, target)
            shutil.copy(audit.head_path(path), target)
        return target, target / closed[-1].name

    def edit(lines):
        record = json.loads(lines[-1])
        record["site"] = "onprem" if record["site"] != "onprem" else "cloud"
        return [*lines[:-1], audit.canonical(record) + b"\n"]

    cases = {
        "edited": edit,
        "deleted": lambda lines: [lines[0], *lines[2:]],
        "swapped": lambda lines: [lines[1], lines[0], *lines[2:]],
        "cut off": lambda lines: lines[:-1],
    }
    for name, change in cases.items():
        target, segment = copy()
        lines = segment.read_bytes().splitlines(keepends=True)
        assert len(lines) >= 3
        segment.write_bytes(b"".join(change(lines)))
        result = spillway("audit", "verify", "--dir", str(target))
        assert result.returncode == 1 and "FAILED" in result.stdout, (name, result.stdout)
    untouched, _ = copy()
    assert spillway("audit", "verify", "--dir", str(untouched)).returncode == 0
