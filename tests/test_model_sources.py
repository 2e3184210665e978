"""Model sources: ``s3://`` against a real S3-compatible server on loopback (moto's server mode),
downloaded with boto3 into a node-local cache, verified, safe when several replicas on one node
start at once; paths and hub ids unchanged."""

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from deployments.model_prep import prepare_model
from deployments.sources import (
    MANIFEST_NAME,
    ModelSourceError,
    S3Source,
    resolve_model_source,
    upload_model,
)


def s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


class CountingClient:
    """A boto3 S3 client that counts the objects it downloads (to see who downloaded)."""

    def __init__(self, client):
        self._client = client
        self.downloads = 0

    def get_object(self, **kwargs):
        self.downloads += 1
        return self._client.get_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".spillway")}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return prepare_model("dense", tmp_path_factory.mktemp("models"))


@pytest.fixture
def uri(s3_server, request) -> str:
    return f"s3://{s3_server[1]}/models/{request.node.name[:40]}"


def test_an_uploaded_model_downloads_verified_and_identical(s3_server, model_folder, uri, tmp_path):
    endpoint = s3_server[0]
    assert upload_model(model_folder, uri, client=s3(endpoint)) == len(digests(model_folder))
    client = CountingClient(s3(endpoint))
    local = S3Source.parse(uri).fetch(tmp_path / "cache", client=client)
    assert local == tmp_path / "cache" / "s3" / s3_server[1] / uri.split("/", 3)[3]
    assert {k: v for k, v in digests(local).items() if k != MANIFEST_NAME} == digests(model_folder)
    first = client.downloads
    assert first == len(digests(model_folder)) + 2  # every file, plus the manifest (read, then kept)
    # A second start on the node reuses the copy: the listing is unchanged, nothing is downloaded.
    assert S3Source.parse(uri).fetch(tmp_path / "cache", client=client) == local
    assert client.downloads == first


def test_resolve_uses_boto3s_own_settings_for_the_endpoint(s3_server, model_folder, uri, tmp_path, monkeypatch):
    upload_model(model_folder, uri, client=s3(s3_server[0]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server[0])  # how a replica reaches an S3-compatible store
    path = resolve_model_source(uri, tmp_path)
    assert Path(path, "config.json").is_file()


def test_a_corrupt_object_fails_verification_and_leaves_the_good_copy(s3_server, model_folder, uri, tmp_path):
    endpoint, bucket = s3_server
    client = s3(endpoint)
    upload_model(model_folder, uri, client=client)
    good = S3Source.parse(uri).fetch(tmp_path, client=client)
    before = digests(good)
    key = uri.split("/", 3)[3] + "/config.json"
    client.put_object(Bucket=bucket, Key=key, Body=b'{"tampered": true}')  # the manifest still has the old hash
    with pytest.raises(ModelSourceError, match="config.json failed verification"):
        S3Source.parse(uri).fetch(tmp_path, client=client)
    assert digests(good) == before
    assert not list(tmp_path.rglob("*.download-*"))  # no half-written copy is left behind


def test_a_manifest_that_does_not_match_the_objects_is_refused(s3_server, model_folder, uri, tmp_path):
    endpoint, bucket = s3_server
    client = s3(endpoint)
    upload_model(model_folder, uri, client=client)
    client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3] + "/extra.bin", Body=b"unlisted")
    with pytest.raises(ModelSourceError, match="does not match"):
        S3Source.parse(uri).fetch(tmp_path, client=client)


def test_without_a_manifest_single_part_etags_verify_and_multipart_without_checksum_is_refused(
        s3_server, uri, tmp_path):
    endpoint, bucket = s3_server
    client = s3(endpoint)
    prefix = uri.split("/", 3)[3]
    client.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b'{"a": 1}')
    local = S3Source.parse(uri).fetch(tmp_path, client=client)
    assert (local / "config.json").read_bytes() == b'{"a": 1}'
    part = os.urandom(5 * 1024 * 1024)
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/weights.bin")
    etags = [client.upload_part(Bucket=bucket, Key=f"{prefix}/weights.bin", UploadId=upload["UploadId"],
                                PartNumber=n, Body=part)["ETag"] for n in (1, 2)]
    client.complete_multipart_upload(Bucket=bucket, Key=f"{prefix}/weights.bin", UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n}
                                                                for n, e in zip((1, 2), etags)]})
    with pytest.raises(ModelSourceError, match="cannot verify weights.bin"):
        S3Source.parse(uri).fetch(tmp_path, client=client)


def _fetch_in_process(uri: str, endpoint: str, cache: str, queue) -> None:
    client = CountingClient(s3(endpoint))
    path = S3Source.parse(uri).fetch(Path(cache), client=client)
    queue.put((str(path), client.downloads))


def test_replicas_starting_at_once_on_one_node_download_once(s3_server, model_folder, uri, tmp_path):
    endpoint = s3_server[0]
    upload_model(model_folder, uri, client=s3(endpoint))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_fetch_in_process, args=(uri, endpoint, str(tmp_path), queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert len({path for path, _ in results}) == 1
    downloads = sorted(n for _, n in results)
    assert downloads[:3] == [0, 0, 0] and downloads[3] > 0  # one downloaded; the others used its copy
    assert {k: v for k, v in digests(Path(results[0][0])).items() if k != MANIFEST_NAME} == digests(model_folder)


@pytest.mark.parametrize("bad", ["s3://bucket-only", "s3://b/../etc", "s3:///prefix"])
def test_malformed_s3_uris_are_refused(bad):
    with pytest.raises(ModelSourceError, match="expected s3://"):
        S3Source.parse(bad)


def test_paths_and_hub_ids_pass_through_unchanged(tmp_path):
    assert resolve_model_source("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model_source(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "missing"))
