"""Shared fixtures. The end-to-end fixtures start a real two-node (two-site) Ray cluster on this
machine with real vLLM engines, through the same code as `spillway up --local`, on ports of
their own so they never touch a cluster a developer is running."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest
import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, load_config
from tests.s3_server import s3_server  # noqa: F401 - a session fixture (a real S3-compatible server)

E2E_RAY_PORT = int(os.environ.get("SPILLWAY_TEST_RAY_PORT", "6390"))
E2E_HTTP_PORT = int(os.environ.get("SPILLWAY_TEST_HTTP_PORT", "8700"))
E2E_CLIENT_TIMEOUT_S = 8
E2E_BODY_TIMEOUT_S = 4
E2E_MAX_BODY_BYTES = 1_048_576
E2E_DENSE_SLOTS = 8
E2E_METRICS_PORT = 8710  # outside Ray worker ports (10002-19999)
E2E_SPLIT_ALIAS = "spillway-chat"
E2E_OTLP_PORT = 8720  # the test's stand-in OpenTelemetry collector (vLLM's spans)
E2E_ADMIN_KEY = "e2e-admin-" + secrets.token_hex(16)
E2E_TENANT = "e2e"
E2E_LOAD_TENANTS = ("alpha", "beta", "gamma")
E2E_AUDIT_PREFIX = "e2e/audit/"
E2E_CENTRAL = "central"  # a model only the external site serves
E2E_CENTRAL_REMOTE = "central-llm"  # its name on that site
# Filled by the e2e_cluster fixture: the health report before any key existed, and the session's
# API key. Once a key exists every request needs one, so every end-to-end test sends it (auth()).
E2E_STATE: dict = {"moe_prefix": f"e2e-{uuid.uuid4().hex[:12]}/spillway-moe"}


# ---- how the test process ends ------------------------------------------------------------
# The end-to-end tests make this process a Ray driver (several times), and it also holds gRPC,
# torch and vLLM's native libraries. Their C++ teardown at interpreter exit (static destructors
# racing background threads) crashed one CI run with SIGSEGV after "545 passed". Once pytest has
# reported and unconfigured, the result is decided: end the process with that status, skipping
# only the interpreter's own finalisation. (Every fixture, cluster and server has been stopped by
# then; a crash during the tests themselves still fails the run, with pytest's faulthandler dump.)
_SESSION: dict = {}


def pytest_sessionfinish(session, exitstatus):
    _SESSION["session"] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    session = _SESSION.get("session")
    if session is None:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter._tw.flush()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        stream.flush()
    os._exit(int(session.exitstatus))


def auth() -> dict:
    """The session API key's header (every end-to-end request goes through governance)."""
    return {"authorization": f"Bearer {e2e_api_key()}"}


def e2e_api_key() -> str:
    return E2E_STATE["key"]["key"]


def e2e_key_id() -> str:
    return E2E_STATE["key"]["id"]


def admin_headers() -> dict:
    return {"authorization": f"Bearer {E2E_ADMIN_KEY}"}


def e2e_raw_config(root=None, s3: tuple[str, str] | None = None, moe_source: str | None = None,
                   external_url: str | None = None) -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["name"] = "spillway-test"
    # Clients gone quiet are let go sooner than by default, so the test of it is short.
    raw["http"] = {"host": "127.0.0.1", "port": E2E_HTTP_PORT, "client_timeout_s": E2E_CLIENT_TIMEOUT_S}
    raw["router"]["body_timeout_s"] = E2E_BODY_TIMEOUT_S
    raw["local_cluster"]["ray_port"] = E2E_RAY_PORT
    raw["local_cluster"]["dashboard_port"] = E2E_RAY_PORT + 1900
    raw["local_cluster"]["metrics_export_port"] = E2E_METRICS_PORT
    raw["router"]["max_body_bytes"] = E2E_MAX_BODY_BYTES
    raw["router"]["benchmark_modes"] = True  # so the routing benchmark's baselines are tested too
    raw["router"]["replicas"] = 2  # scale-out: every end-to-end test goes through two router replicas
    # Fail fast when an engine is gone, so the 503 test does not wait two minutes.
    raw["router"]["first_response_timeout_s"] = 15
    # Few on-prem slots and a tight TTFT budget for dense, so tests can saturate on-prem cheaply.
    raw["models"][0]["engine"]["max_num_seqs"] = E2E_DENSE_SLOTS
    raw["models"][0]["spill_after_ms"] = 300
    raw["governance"] = {"store": {"path": str(root / "ledger.sqlite3")}} if root is not None else {}
    if s3 is not None:  # closed audit segments go to the session's S3-compatible server
        raw["governance"]["audit"] = {"archive": {"bucket": s3[1], "prefix": E2E_AUDIT_PREFIX, "endpoint_url": s3[0]}}
    if moe_source is not None:  # the MoE engine loads its weights from S3 (credentials: ray start's env)
        moe = raw["models"][1]
        moe["source"] = moe_source
        moe["env"] = {**moe["env"], "AWS_ENDPOINT_URL": s3[0]}  # (a copy: the YAML shares one env dict)
    raw["router"]["splits"] = {E2E_SPLIT_ALIAS: {"variants": {"spillway-dense": 70, "spillway-moe": 30}}}
    if external_url is not None:
        # An external API site (a real vLLM server on loopback, behind a recording proxy) is the
        # only home of the general model "central": `auto` sends general prompts there, and a
        # confidential one to on-prem dense instead (auto); `auto-strict` has no fallback (403).
        raw["sites"].append({"name": "api", "kind": "external", "preference": 2,
                             "cost": {"basis": "api", "input_per_million": 2.5, "output_per_million": 10.0},
                             "external": {"base_url": external_url, "models": {E2E_CENTRAL: E2E_CENTRAL_REMOTE},
                                          "max_concurrency": 8, "retries": 1}})
        raw["models"].append({"id": E2E_CENTRAL, "replicas": {"api": 1}})
        auto = raw["router"]["semantic_routes"]["auto"]
        auto["targets"]["general"].update(model=E2E_CENTRAL, confidential_fallback="spillway-dense")
        strict = yaml.safe_load(yaml.safe_dump(auto))
        strict["targets"]["general"].pop("confidential_fallback")
        raw["router"]["semantic_routes"]["auto-strict"] = strict
    # Router spans stay in memory (read back over HTTP); vLLM sends its spans to the test's receiver.
    raw["tracing"] = {
        "exporter": "memory", "sample_ratio": 1.0,
        "engine_endpoint": f"http://127.0.0.1:{E2E_OTLP_PORT}/v1/traces", "engine_protocol": "http/protobuf",
    }
    return raw


def router_dispatch_views(base_url: str, routers: int = 2, timeout_s: float = 60,
                          ready: Callable[[dict], bool] = lambda view: all(view["replicas"].values())) -> dict:
    """{router replica: its direct-dispatch report and its streams by path}, polling until every router replica answered
    and each is ``ready`` (by default: it knows a replica of every engine deployment)."""
    import httpx

    views, deadline = {}, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = httpx.get(f"{base_url}/v1/spillway/scheduler", timeout=30).json()
        if ready(report["direct_dispatch"]):
            views[report["router_replica"]] = {**report["direct_dispatch"], "streams": report["streams"]}
        if len(views) >= routers:
            return views
        time.sleep(0.1)
    raise AssertionError(f"router replicas never all got ready for direct requests: {views}")


def clients_per_router(base_url: str, routers: int = 2, headers: dict | None = None, timeout_s: float = 120,
                       attempts: int = 64) -> list:
    """One kept-alive ``httpx.Client`` per router replica. The routers share the clients' port
    (``http.ingress: shared``): the kernel gives each new connection to one of them and a kept-alive
    connection stays there, so a test that must reach every replica holds a connection to each.
    The caller closes them."""
    import httpx

    found: dict = {}
    for _ in range(attempts):
        client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        router = client.get("/v1/spillway/scheduler").json()["router_replica"]
        if router in found:
            client.close()
        else:
            found[router] = client
        if len(found) == routers:
            return list(found.values())
    for client in found.values():
        client.close()
    raise AssertionError(f"{attempts} new connections reached only {sorted(found)}")


@pytest.fixture(scope="session")
def otlp_receiver():
    from tests.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver(E2E_OTLP_PORT).start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def external_api(tmp_path_factory):
    """The e2e cluster's external site: a real vLLM OpenAI server on loopback (the dense model,
    named ``central-llm``) behind a proxy that records what reached it. Started with the session;
    a test that needs it answering calls ``server.wait_ready()``."""
    from deployments.model_prep import prepare_model
    from tests.vllm_server import TcpProxy, VllmServer, free_port

    root = tmp_path_factory.mktemp("external-api")
    server = VllmServer(str(prepare_model("dense")), E2E_CENTRAL_REMOTE, free_port(), root / "vllm.log").start()
    proxy = TcpProxy(server.port).start()
    yield server, proxy
    proxy.stop()
    server.stop()


@pytest.fixture(scope="session")
def e2e_cluster(tmp_path_factory, otlp_receiver, s3_server, external_api):
    """A running Spillway on a real local two-site Ray cluster. Yields (config, config_path, base_url)."""
    from serve_app.ops.deploy import deploy
    from serve_app.ops.local_cluster import LocalCluster

    root = tmp_path_factory.mktemp("spillway-e2e")
    config_path = root / "config.yaml"
    moe_source = upload_e2e_moe(s3_server)
    # (its AWS_* reach the ledger and the engines through `ray start`'s environment)
    config_path.write_text(yaml.safe_dump(e2e_raw_config(root, s3=s3_server, moe_source=moe_source,
                                                         external_url=external_api[1].base_url)))
    os.environ[load_config(config_path).governance.admin_key_env] = E2E_ADMIN_KEY  # ray start passes it on
    config = load_config(config_path)
    cluster = LocalCluster(config, state_file=root / "cluster.json")
    cluster.start(log=print)
    # Ray's state API finds "the" cluster through /tmp/ray/ray_current_cluster, which the newest
    # `ray start` on this machine rewrites (the direct-ingress test starts a cluster of its own).
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        deploy(config, cluster.address, log=print)
        base_url = f"http://127.0.0.1:{E2E_HTTP_PORT}"
        _create_session_keys(base_url)
        yield config, config_path, base_url
    finally:
        import ray

        ray.shutdown()
        cluster.stop(log=print)
        if e2e_moe_local_copy() is not None:
            shutil.rmtree(e2e_moe_local_copy(), ignore_errors=True)


def upload_e2e_moe(s3_server) -> str:
    """The built-in MoE model, uploaded for this session under a fresh prefix (so its node-local
    copy is downloaded by this session's replica, never left over from an earlier run)."""
    import boto3

    from deployments.model_prep import prepare_model
    from deployments.sources import upload_model

    uri = f"s3://{s3_server[1]}/models/{E2E_STATE['moe_prefix']}"
    upload_model(prepare_model("moe"), uri, client=boto3.client("s3", endpoint_url=s3_server[0]))
    E2E_STATE["moe_source"] = uri
    return uri


def e2e_moe_local_copy() -> Path | None:
    """Where this session's engine replica copied the MoE model from S3 (node-local cache)."""
    from deployments.sources import DEFAULT_CACHE_DIR, S3Source

    source = E2E_STATE.get("moe_source")
    return S3Source.parse(source).local_dir(DEFAULT_CACHE_DIR) if source else None


def _create_session_keys(base_url: str) -> None:
    """Record that the fresh cluster was open, then create the session's key (and the load
    test's tenants' keys): from here on, every request needs a key."""
    import httpx

    E2E_STATE["health_before_keys"] = httpx.get(f"{base_url}/health", timeout=60).json()
    admin = f"{base_url}/v1/spillway/admin"

    def create(tenant: str) -> dict:
        resp = httpx.post(f"{admin}/keys", json={"tenant": tenant, "name": "e2e session"}, headers=admin_headers(),
                          timeout=60)
        assert resp.status_code == 201, resp.text
        return resp.json()

    E2E_STATE["key"] = create(E2E_TENANT)
    os.environ["SPILLWAY_API_KEY"] = e2e_api_key()  # the load-test subprocesses' users
    os.environ["SPILLWAY_TENANTS"] = ",".join(f"{t}={create(t)['key']}" for t in E2E_LOAD_TENANTS)


@pytest.fixture(scope="session")
def base_url(e2e_cluster):
    return e2e_cluster[2]


# The session's SDK clients open a connection per request. The routers share the port per
# connection (`http.ingress: shared`): this spreads the tests' requests over both routers, and a
# connection kept alive to the router that a governance test kills cannot fail a later test (the
# clients do not retry, so that what a test sees is what the router answered).
NO_KEEP_ALIVE = {"max_keepalive_connections": 0}


@pytest.fixture(scope="session")
def client(base_url):
    import httpx
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=e2e_api_key(), max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(limits=httpx.Limits(**NO_KEEP_ALIVE)))


@pytest.fixture(scope="session")
def aclient(base_url):
    import httpx
    import openai

    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=e2e_api_key(), max_retries=0, timeout=300,
                              http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(**NO_KEEP_ALIVE)))


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the whole session (tests/pg_server.py)."""
    from tests.pg_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
