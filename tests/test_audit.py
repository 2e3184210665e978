"""The audit log (``serve_app/governance/audit.py``): the real writer on real files, ``spillway
audit verify`` on them, each kind of tampering, crash recovery, and the archive on a real
S3-compatible server (moto's server mode on loopback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serve_app.governance import audit
from serve_app.ops.cli import main as spillway


def make_log(directory: Path, key_path: Path, count: int = 30, per_write: int = 4, rotate_bytes: int = 2_000,
             clock=None) -> audit.AuditWriter:
    key = audit.load_or_create_key(key_path)
    writer = audit.AuditWriter(directory, key, rotate_bytes, 3600.0, **({"clock": clock} if clock else {}))
    for start in range(0, count, per_write):
        writer.write([{"request_id": f"req-{i}", "tenant": "acme", "site": "onprem", "cost": 0.001 * i,
                       "status": 200} for i in range(start, min(count, start + per_write))])
    return writer


def verify(directory: Path, *extra: str) -> tuple[int, str]:
    return spillway(["audit", "verify", "--dir", str(directory), *extra]), ""


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture()
def log(tmp_path) -> Path:
    directory = tmp_path / "audit"
    make_log(directory, tmp_path / "signing.key")
    return directory


def test_a_written_log_verifies_across_segments(log, capsys):
    segments = audit.segment_files(log)
    assert len(segments) >= 3  # rotated by size
    assert spillway(["audit", "verify", "--dir", str(log)]) == 0
    out = capsys.readouterr().out
    assert "audit log OK: 30 record(s)" in out
    records = audit.tail(log, 100)
    assert [r["seq"] for r in records] == list(range(1, 31))
    assert records[0]["prev"] == audit.GENESIS and records[1]["prev"] == records[0]["hash"]


def tamper_first_segment_with_records(log: Path, change) -> None:
    path = audit.segment_files(log)[1][1]
    lines = lines_of(path)
    path.write_bytes(b"".join(change(lines)))


def edited(lines):
    record = json.loads(lines[1])
    record["tenant"] = "someone-else"
    return [lines[0], audit.canonical(record) + b"\n", *lines[2:]]


def edited_and_rehashed(lines):  # the attacker recomputes the hash too: the chain still breaks
    record = json.loads(lines[1])
    record["cost"] = 0.0
    record["hash"] = audit.record_hash(record)
    return [lines[0], audit.canonical(record) + b"\n", *lines[2:]]


@pytest.mark.parametrize("change, expected", [
    (edited, "edited"),
    (edited_and_rehashed, "chain is broken"),
    (lambda lines: [lines[0], *lines[2:]], "removed, inserted or reordered"),
    (lambda lines: [lines[1], lines[0], *lines[2:]], "removed, inserted or reordered"),
])
def test_verify_detects_an_edited_a_deleted_and_two_swapped_records(log, capsys, change, expected):
    tamper_first_segment_with_records(log, change)
    assert spillway(["audit", "verify", "--dir", str(log)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and expected in out


def test_verify_detects_the_last_records_cut_off(log, capsys):
    last = audit.segment_files(log)[-1][1]
    lines = lines_of(last)
    last.write_bytes(b"".join(lines[:-2]))
    assert spillway(["audit", "verify", "--dir", str(log)]) == 1
    assert "records were cut off" in capsys.readouterr().out


def test_verify_detects_a_whole_segment_removed_and_a_forged_head(log, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(log, copy)
    middle = audit.segment_files(copy)[1][1]
    middle.unlink()
    audit.head_path(middle).unlink()
    assert spillway(["audit", "verify", "--dir", str(copy)]) == 1
    assert "missing" in capsys.readouterr().out
    # A head re-signed with another key fails against the operator's copy of the public key.
    pub = tmp_path / "operator.pub"
    pub.write_bytes((log / audit.PUBLIC_KEY_FILE).read_bytes())
    other = make_log(tmp_path / "other", tmp_path / "other.key", count=4)
    for _, segment in audit.segment_files(log):
        head = json.loads(audit.head_path(segment).read_bytes())
        head.pop("sig")
        import base64
        head["sig"] = base64.b64encode(other.key.sign(audit.canonical(head))).decode()
        audit.head_path(segment).write_bytes(audit.canonical(head))
    assert spillway(["audit", "verify", "--dir", str(log), "--public-key", str(pub)]) == 1
    assert "signature does not verify" in capsys.readouterr().out


def test_a_crash_mid_write_is_recovered_and_the_chain_goes_on(tmp_path, capsys):
    directory, key = tmp_path / "audit", tmp_path / "signing.key"
    make_log(directory, key, count=6, rotate_bytes=10**6)
    open_segment = audit.segment_files(directory)[-1][1]
    with open_segment.open("ab") as out:
        out.write(b'{"request_id":"torn')  # the process died mid-line
    writer = make_log(directory, key, count=5, rotate_bytes=10**6)  # a restart, then more records
    assert writer.seq == 11
    assert spillway(["audit", "verify", "--dir", str(directory)]) == 0
    assert "11 record(s)" in capsys.readouterr().out


def test_a_tampered_log_is_not_re_signed_by_a_restart(tmp_path, capsys):
    directory, key = tmp_path / "audit", tmp_path / "signing.key"
    make_log(directory, key, count=6, rotate_bytes=10**6)
    segment = audit.segment_files(directory)[-1][1]
    lines = lines_of(segment)
    record = json.loads(lines[-1])
    record["tenant"] = "x"
    record["hash"] = audit.record_hash(record)  # consistent on its own, not with the checkpoint
    segment.write_bytes(b"".join([*lines[:-1], audit.canonical(record) + b"\n"]))
    make_log(directory, key, count=2, rotate_bytes=10**6)
    assert spillway(["audit", "verify", "--dir", str(directory)]) == 1
    assert "cut off or replaced" in capsys.readouterr().out


def test_closed_segments_are_archived_with_checksums_and_verify_from_s3(tmp_path, s3_server, capsys):
    endpoint, bucket = s3_server
    directory = tmp_path / "audit"
    writer = make_log(directory, tmp_path / "signing.key")
    writer.rotate()
    archiver = audit.Archiver(bucket, "prod/audit/", endpoint)
    segments = len(audit.segment_files(directory))
    assert archiver.archive_closed(directory) == segments
    assert archiver.archive_closed(directory) == 0  # each segment once
    url = f"s3://{bucket}/prod/audit"
    assert spillway(["audit", "verify", "--s3", url, "--endpoint-url", endpoint]) == 0
    out = capsys.readouterr().out
    assert "audit log OK: 30 record(s)" in out and "checked against its SHA-256" in out
    # An object changed in the archive (metadata kept) no longer matches its checksum.
    key = f"prod/audit/{audit.segment_files(directory)[0][1].name}"
    stored = archiver.client.head_object(Bucket=bucket, Key=key)["Metadata"]
    archiver.client.put_object(Bucket=bucket, Key=key, Body=b"{}\n", Metadata=stored)
    assert spillway(["audit", "verify", "--s3", url, "--endpoint-url", endpoint]) == 1
    assert "does not match" in capsys.readouterr().out
