"""Deploy a Spillway config onto a running Ray cluster, and report on it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from serve_app.app import build_app, deployment_name
from serve_app.config import SpillwayConfig

HEALTH_TIMEOUT_S = 600.0


def connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, namespace="spillway")


def deploy(config: SpillwayConfig, address: str, log: Callable[[str], None] = print) -> None:
    """Start Serve (proxy on the head node only), deploy the app and wait until /health is green."""
    from ray import serve

    connect(address)
    # HeadOnly: one proxy (HAProxy, or Serve's own), on the head (on-prem) node. Proxies on every
    # node would all bind the same port on a one-machine cluster, and prompts would enter the cloud.
    # With shared or direct ingress the router replicas listen themselves; Serve still starts a
    # head-node proxy, which must not take that port.
    proxy_port = config.http.proxy_port(config.router.replicas)
    serve.start(proxy_location="HeadOnly", http_options={"host": config.http.host, "port": proxy_port})
    log(f"deploying application '{config.name}' ({len(config.models)} models) ...")
    serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
    wait_healthy(config, log=log)


def wait_healthy(config: SpillwayConfig, timeout_s: float = HEALTH_TIMEOUT_S, log: Callable[[str], None] = print) -> dict:
    url = f"http://{config.http.host}:{config.http.port}/health"
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = str(exc)
        time.sleep(2.0)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s (last: {last})")


def undeploy(config: SpillwayConfig, address: str) -> None:
    from ray import serve

    connect(address)
    serve.delete(config.name)


def status(config: SpillwayConfig, address: str) -> dict[str, Any]:
    """Sites (nodes and their resources), and each engine deployment's status and replicas."""
    import ray
    from ray import serve

    connect(address)
    sites: dict[str, list[dict[str, Any]]] = {site.name: [] for site in config.sites if site.external is None}
    external = {site.name: {"base_url": site.external.base_url,
                            "models": sorted(m.id for m in config.models if m.replicas.get(site.name, 0) > 0)}
                for site in config.sites if site.external is not None}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        for site in config.sites:
            if site.external is None and site.resource in node["Resources"]:
                sites[site.name].append({"node_id": node["NodeID"][:12], "cpus": node["Resources"].get("CPU", 0)})
    app_status = serve.status().applications.get(config.name)
    deployments: dict[str, Any] = {}
    if app_status is not None:
        for name, dep in app_status.deployments.items():
            deployments[name] = {"status": str(dep.status.value), "replicas": dict(dep.replica_states)}
    engines = []
    for model in config.models:
        for site_name, wanted in model.replicas.items():
            if site_name in external:
                continue  # (no deployment: the routers call its API)
            name = deployment_name(model.id, site_name)
            engines.append({
                "model": model.id,
                "site": site_name,
                "deployment": name,
                "wanted": wanted,
                "state": deployments.get(name, {"status": "NOT_DEPLOYED" if wanted else "NONE", "replicas": {}}),
            })
    return {
        "application": None if app_status is None else str(app_status.status.value),
        "sites": sites,
        "external_sites": external,
        "router": deployments.get("router"),
        "engines": engines,
    }
