"""The audit log: one append-only, hash-chained record per request, with signed checkpoints.

Records are made by the routers' outcome sinks, travel to the ledger with the settlement batches
(``client.py``), and are written here by the ledger, on a worker thread, every
``flush_interval_ms`` (``service.py``). One writer per cluster means one chain per cluster.

Format: a directory of segments. ``audit-<first seq>.jsonl`` holds one record per line, as
canonical JSON (sorted keys, no spaces). Each record carries ``seq`` (1, 2, 3, ... across all
segments), ``prev`` (the previous record's hash; 64 zeros before the first) and ``hash``, the
SHA-256 of the record's canonical JSON without ``hash``. ``audit-<first seq>.head`` is the
segment's signed checkpoint: its last ``seq`` and ``hash``, whether it is closed, and an Ed25519
signature (``cryptography``) over all of that. It is rewritten (atomically) after every write.

What ``verify`` detects: an edited field (the hash), a removed or inserted record (``seq`` and
``prev``), two records swapped (both), records cut off the end (the head names a record that is
not there), a forged head (the signature). What it cannot: records written after the last
checkpoint and then cut off together with nothing else; at most one write's worth (records of
one ``flush_interval_ms``), and ``verify`` reports records found after the last checkpoint. An
attacker who can also rewrite a head needs the signing key; keep it (and the public key that
verifies) apart from the log, and archive closed segments (``Archiver``: S3 or an S3-compatible
server, with SHA-256 checksums) where the log's host cannot delete them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger("spillway.audit")

GENESIS = "0" * 64
SEGMENT = re.compile(r"^audit-(\d{12})\.jsonl$")
PUBLIC_KEY_FILE = "audit-signing.pub"
ARCHIVED_SUFFIX = ".archived"


def canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def segment_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}"


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key: read, or made once (mode 0600, never overwritten)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another process: use that one
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class AuditWriter:
    """Appends records and signs the head; one call at a time (the service's worker thread)."""

    def __init__(self, directory: Path, key: Ed25519PrivateKey, rotate_bytes: int, rotate_s: float,
                 clock=time.time):
        self.directory = directory
        self.key = key
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self.clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(directory / PUBLIC_KEY_FILE, public_pem(key.public_key()))
        self.fingerprint = fingerprint(key.public_key())
        self.seq, self.prev = 0, GENESIS
        self._segment: Path | None = None  # the open segment, None until the next write
        self._first = 0
        self._size = 0
        self._opened_at = 0.0
        self._recover()

    def _recover(self) -> None:
        """Continue the chain after the last record on disk. An open segment left by a crash is
        closed first: a torn last line (written after the last checkpoint) is cut off."""
        segments = segment_files(self.directory)
        if not segments:
            return
        first, path = segments[-1]
        valid, size = [], 0
        with path.open("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                valid.append(record)
                size += len(line)
        if size < path.stat().st_size:
            logger.warning("audit: cut %d torn byte(s) off the end of %s", path.stat().st_size - size, path.name)
            with path.open("r+b") as out:
                out.truncate(size)
        head = read_head(head_path(path))
        if valid:
            self.seq, self.prev = valid[-1]["seq"], valid[-1]["hash"]
        elif head is not None:
            self.seq, self.prev = head["seq"], head["hash"]
        if head is not None and head.get("closed"):
            return
        signed = {r["seq"]: r["hash"] for r in valid}
        if head is None or not self._signed_by_me(head) or signed.get(head["seq"]) != head["hash"]:
            # Never sign over what does not match the last checkpoint: ``verify`` reports it.
            logger.error("audit: %s does not match its last checkpoint; left as it is, a new segment follows",
                         path.name)
            return
        self._segment, self._first = path, first
        self._close_segment()

    def _signed_by_me(self, head: dict) -> bool:
        try:
            self.key.public_key().verify(base64.b64decode(head.get("sig", "")),
                                         canonical({k: v for k, v in head.items() if k != "sig"}))
            return True
        except (InvalidSignature, ValueError):
            return False

    def write(self, records: list[dict]) -> list[Path]:
        """Chain, append and sign; returns the segments this write closed (to archive). A write
        that fails leaves the file and the chain as they were."""
        closed = []
        if records:
            if self._segment is None:
                self._open()
            seq, prev, lines = self.seq, self.prev, []
            for record in records:
                seq += 1
                record = {**record, "seq": seq, "prev": prev}
                record["hash"] = prev = record_hash(record)
                lines.append(canonical(record) + b"\n")
            size = self._size
            try:
                with self._segment.open("ab") as out:
                    out.write(b"".join(lines))
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                with self._segment.open("r+b") as out:
                    out.truncate(size)
                raise
            self.seq, self.prev = seq, prev
            self._size = size + sum(len(line) for line in lines)
            self._sign(closed=False)
        if self.due():
            closed.append(self._close_segment())
        return closed

    def due(self) -> bool:
        """The open segment is full or old enough to close."""
        return self._segment is not None and (self._size >= self.rotate_bytes
                                              or self.clock() - self._opened_at >= self.rotate_s)

    def rotate(self) -> list[Path]:
        """Close the open segment now (if it has records)."""
        return [self._close_segment()] if self._segment is not None else []

    def _open(self) -> None:
        self._first = self.seq + 1
        self._segment = self.directory / f"{segment_name(self._first)}.jsonl"
        self._segment.touch()
        self._size = 0
        self._opened_at = self.clock()

    def _close_segment(self) -> Path:
        self._sign(closed=True)
        path, self._segment = self._segment, None
        return path

    def _sign(self, closed: bool) -> None:
        head = {"segment": self._segment.name, "first_seq": self._first, "seq": self.seq, "hash": self.prev,
                "closed": closed, "at": self.clock(), "key": self.fingerprint}
        head["sig"] = base64.b64encode(self.key.sign(canonical(head))).decode()
        _write_atomically(head_path(self._segment), canonical(head) + b"\n")


def head_path(segment: Path) -> Path:
    return segment.with_suffix(".head")


def read_head(path: Path) -> dict | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        match = SEGMENT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def tail(directory: Path, count: int) -> list[dict]:
    """The last ``count`` records (newest last), for the console and the admin API."""
    out: list[dict] = []
    for _, path in reversed(segment_files(directory)):
        with path.open("rb") as lines:
            records = [json.loads(line) for line in lines if line.endswith(b"\n")]
        out[:0] = records[-(count - len(out)):]
        if len(out) >= count:
            break
    return out


# ---- verification -------------------------------------------------------------------------------

@dataclass
class Report:
    segments: int = 0
    records: int = 0
    unsigned_tail: int = 0  # records after the last checkpoint (a crash's, or cut off unseen)
    problems: list[str] = field(default_factory=list)
    key: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        verdict = "OK" if self.ok else f"FAILED ({len(self.problems)} problem(s))"
        out = [f"audit log {verdict}: {self.records} record(s) in {self.segments} segment(s), "
               f"checkpoints signed by key {self.key}"]
        if self.unsigned_tail:
            out.append(f"note: {self.unsigned_tail} record(s) after the last checkpoint (written after it, "
                       "not covered by a signature)")
        out += [f"problem: {p}" for p in self.problems]
        return out


def verify(directory: Path, public: Ed25519PublicKey | None = None, require_closed: bool = False) -> Report:
    """Check every segment's chain, the chain across segments, and every head's signature."""
    if public is None:
        public = load_public_key(directory / PUBLIC_KEY_FILE)
    report = Report(key=fingerprint(public))
    segments = segment_files(directory)
    report.segments = len(segments)
    if not segments:
        report.problems.append(f"no audit segments in {directory}")
        return report
    seq, prev = 0, GENESIS
    for index, (first, path) in enumerate(segments):
        name = path.name
        if first != seq + 1:
            report.problems.append(f"{name}: starts at record {first}, expected {seq + 1} "
                                   "(a segment or records before it are missing)")
        head = read_head(head_path(path))
        if head is None:
            report.problems.append(f"{name}: its signed head is missing")
        else:
            signature = head.get("sig", "")
            try:
                public.verify(base64.b64decode(signature), canonical({k: v for k, v in head.items() if k != "sig"}))
            except (InvalidSignature, ValueError):
                report.problems.append(f"{name}: the head's signature does not verify (forged or other key)")
                head = None
        hashes: dict[int, str] = {}
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                where = f"{name} line {number}"
                try:
                    record = json.loads(line)
                except ValueError:
                    report.problems.append(f"{where}: not a JSON record")
                    continue
                if not isinstance(record, dict):
                    report.problems.append(f"{where}: not a JSON record")
                    continue
                report.records += 1
                if record.get("hash") != record_hash(record):
                    report.problems.append(f"{where} (record {record.get('seq')}): edited (its hash does not match)")
                if record.get("seq") != seq + 1:
                    report.problems.append(f"{where}: record {record.get('seq')} where {seq + 1} was expected "
                                           "(removed, inserted or reordered records)")
                if record.get("prev") != prev:
                    report.problems.append(f"{where} (record {record.get('seq')}): does not follow the record "
                                           "before it (the chain is broken)")
                seq = record.get("seq") if isinstance(record.get("seq"), int) else seq + 1
                prev = record.get("hash", "")
                hashes[seq] = prev
        if head is not None:
            last = head.get("seq")
            if hashes.get(last) != head.get("hash") and not (last == first - 1 and not hashes):
                report.problems.append(f"{name}: the signed checkpoint names record {last}, which is missing or "
                                       "different (records were cut off or replaced)")
            elif isinstance(last, int) and seq > last:
                if head.get("closed"):
                    report.problems.append(f"{name}: {seq - last} record(s) after the closing checkpoint")
                else:
                    report.unsigned_tail += seq - last
            closing = index < len(segments) - 1 or require_closed
            if closing and not head.get("closed"):
                report.problems.append(f"{name}: not closed, yet a later segment exists or it was archived"
                                       if index < len(segments) - 1 else f"{name}: not closed")
    return report


# ---- archive ----------------------------------------------------------------------------------

class Archiver:
    """Copies closed segments (records and head) and the public key to S3 or an S3-compatible
    server, each object with its SHA-256 (S3's checksum, checked by the server on upload, and
    in the metadata). A segment is marked archived only once both objects are stored."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, region: str = "us-east-1"):
        import boto3

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def put(self, path: Path) -> None:
        data = path.read_bytes()
        digest = hashlib.sha256(data).digest()
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + path.name, Body=data,
                               ChecksumSHA256=base64.b64encode(digest).decode(),
                               Metadata={"sha256": digest.hex()})

    def archive_closed(self, directory: Path) -> int:
        """Upload every closed segment not yet archived; returns how many."""
        done = 0
        for _, path in segment_files(directory):
            marker = path.with_name(path.name + ARCHIVED_SUFFIX)
            head = read_head(head_path(path))
            if marker.exists() or head is None or not head.get("closed"):
                continue
            self.put(directory / PUBLIC_KEY_FILE)
            self.put(path)
            self.put(head_path(path))
            marker.touch()
            done += 1
        return done

    def download(self, target: Path) -> int:
        """Fetch every object under the prefix into ``target``, checking each one's SHA-256."""
        count = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(self.prefix):]
                if "/" in name or not name:
                    continue
                answer = self.client.get_object(Bucket=self.bucket, Key=item["Key"])
                data = answer["Body"].read()
                stated = answer.get("Metadata", {}).get("sha256")
                if stated != hashlib.sha256(data).hexdigest():
                    raise ValueError(f"s3://{self.bucket}/{item['Key']}: its SHA-256 does not match the one "
                                     "stored with it (changed in the archive)")
                (target / name).write_bytes(data)
                count += 1
        return count
