"""The Ray connection: an embedded cluster on 127.0.0.1, or an existing one joined by address.

Failures to connect are fast and named (:class:`ClusterUnavailable`): Ray itself would retry for
minutes against an address where nothing answers.
"""

from __future__ import annotations

import os
import socket

import ray

import trainmem

from .config import ClusterConfig


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by ``cluster.address`` cannot be joined; the message says why and what to do."""


def connect_ray(cfg: ClusterConfig) -> bool:
    """Join ``cfg.address`` or start an embedded cluster; returns True if this call started Ray."""
    if ray.is_initialized():
        return False
    common = dict(namespace="trainmem", log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if cfg.address:
        _probe_address(cfg.address)
        _require_cluster_mode(cfg.address)
        try:
            ray.init(address=cfg.address, **common)
        except (ConnectionError, RuntimeError) as e:
            auth = "token" in str(e).lower() or "auth" in str(e).lower()
            fix = (
                "the cluster uses token auth: export RAY_AUTH_MODE=token and make its token available "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
                if auth
                else "check that a Ray head runs there (ray status --address ...) and the port is reachable"
            )
            raise ClusterUnavailable(f"cannot join Ray at cluster.address={cfg.address!r}: {fix}") from None
    else:
        _require_loopback()
        need = int((cfg.workers + cfg.spares) * cfg.cpus_per_worker + 0.999)  # spares reserve CPUs too
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, **common)
    return True


def _require_loopback() -> None:
    """An embedded cluster must listen on 127.0.0.1 only; Ray decides that when it is imported."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise ClusterUnavailable(
            "an embedded Ray cluster would listen on this machine's network address: Ray was imported with "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set to enable clusters (fix: unset it, or import trainmem before ray)")


def _require_cluster_mode(address: str) -> None:
    """Joining a cluster on another address needs Ray's cluster mode, which is chosen at import."""
    from ray._private import ray_constants

    if not ray_constants.ENABLE_RAY_CLUSTER and not trainmem.is_loopback_address(address):
        raise ClusterUnavailable(
            f"cluster.address={address!r} is another machine, but Ray was imported in loopback-only mode "
            "(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, trainmem's default) (fix: export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "
            "before starting Python, or use `trainmem launch`, which sets it for jobs with an address)")


def _probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, where ray.init would retry for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"cluster.address={address!r} is not host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnavailable(
            f"cannot join Ray at cluster.address={address!r}: nothing answers there within {timeout_s:g}s ({e}); "
            "start the head (ray start --head) or fix the address"
        ) from None
