"""Where routers find engine replicas: Ray's KV store.

One key per replica, the address in the key itself: ``<app>/<deployment>/<replica_id>/<host>:<port>``.
A replica writes its key again every ``REGISTER_EVERY_S`` with a new value (a heartbeat stamp), so
- a router that removed a key it could not connect to never loses a live replica for long;
- a key whose value stops changing belongs to a replica that died without removing it (a killed
  process, a preempted cloud node): routers drop it after ``STALE_AFTER_S`` by their own clocks
  (only changes are compared, never clocks across nodes), instead of trying its address.

The cluster's secret for direct requests lives here too: made once per Ray cluster, readable only
by its members. These are blocking GCS calls: run them off the event loop.

A replica also listens on a Unix socket whose path follows from its address
(``local_socket_path``), in a directory only its user may enter. A router on the same machine
connects there instead of over TCP: a token then costs both ends about half the socket work
(``benchmarks/NOTES.md``). Frames carry the same secret either way.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time

KV_NAMESPACE = "spillway_gates"
REGISTER_EVERY_S = 10.0
STALE_AFTER_S = 3 * REGISTER_EVERY_S
SECRET_KEY = "secret"  # not under any app prefix, so never listed as a replica


def gate_prefix(app: str, deployment: str) -> str:
    return f"{app}/{deployment}/"


def gate_key(app: str, deployment: str, replica_id: str, host: str, port: int) -> str:
    return f"{gate_prefix(app, deployment)}{replica_id}/{host}:{port}"


def register_gate(app: str, deployment: str, replica_id: str, host: str, port: int) -> str:
    from ray.experimental.internal_kv import _internal_kv_put

    key = gate_key(app, deployment, replica_id, host, port)
    _internal_kv_put(key, str(time.time_ns()).encode(), namespace=KV_NAMESPACE)
    return key


def cluster_secret() -> str:
    """The secret that direct requests carry (64 hex characters)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    _internal_kv_put(SECRET_KEY, secrets.token_hex(32), overwrite=False, namespace=KV_NAMESPACE)
    return _internal_kv_get(SECRET_KEY, namespace=KV_NAMESPACE).decode()


def unregister_gate_address(app: str, deployment: str, replica_id: str, host: str, port: int) -> None:
    unregister_gate(gate_key(app, deployment, replica_id, host, port))


def unregister_gate(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=KV_NAMESPACE)


def list_gates(app: str, deployment: str) -> list[tuple[str, str, int, bytes]]:
    """``(replica_id, host, port, heartbeat stamp)`` of each registered replica of a deployment
    (two GCS calls, whatever the number of replicas)."""
    from ray.experimental.internal_kv import _internal_kv_list, internal_kv_get_gcs_client

    prefix = gate_prefix(app, deployment)
    keys = _internal_kv_list(prefix, namespace=KV_NAMESPACE)
    if not keys:
        return []
    stamps = internal_kv_get_gcs_client().internal_kv_multi_get(keys, namespace=KV_NAMESPACE.encode())
    gates = []
    for key in keys:
        replica_id, _, address = key.decode()[len(prefix):].partition("/")
        host, _, port = address.rpartition(":")
        if replica_id and host and port.isdigit() and key in stamps:  # (gone between the two calls)
            gates.append((replica_id, host, int(port), stamps[key]))
    return gates


def socket_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"spillway-{os.getuid()}")


def local_socket_path(host: str, port: int) -> str:
    """Where the replica listening on ``host:port`` also listens on this machine (a port is held
    by one process at a time, so the path names one live replica)."""
    return os.path.join(socket_dir(), f"engine-{host}-{port}.sock")


def private_socket_dir() -> str | None:
    """The socket directory, made if missing; None unless it is this user's alone (mode 0700)."""
    path = socket_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path)
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path


_node_ips: list[str] = []  # (this process's node address, once known)


def _node_ip() -> str | None:
    if not _node_ips:
        try:
            import ray

            _node_ips.append(ray.util.get_node_ip_address())
        except Exception:  # noqa: BLE001 - not known (yet): TCP meanwhile, asked again next time
            return None
    return _node_ips[0]


def reachable_local_socket(host: str, port: int) -> str | None:
    """The replica's Unix socket when it runs on this machine and listens there, else None.
    Blocking (a stat): call it off the event loop."""
    if host != _node_ip():
        return None
    path = local_socket_path(host, port)
    return path if os.path.exists(path) else None
