"""Does every node see the same checkpoint location? A sentinel written by the driver, read on each node.

A local checkpoint path is only usable by a multi-node job if it is one shared mount: otherwise
rank 0 saves on its node and a rank elsewhere finds nothing (or something else) after a restart.
The driver writes a random token under the location, and a task pinned to each node
(``NodeAffinitySchedulingStrategy``, no CPUs, so busy nodes run it too) reads it back.
"""

from __future__ import annotations

import secrets

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import StorageConfig
from .storage import Location


class LocationNotShared(RuntimeError):
    """Some node does not see the checkpoint location the driver sees; the message names the nodes and the fix."""


@ray.remote(num_cpus=0, max_retries=0)
def _read_sentinel(uri: str, storage: StorageConfig, name: str) -> str:
    try:
        return "token:" + Location(uri, storage).read_text(name)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def check_location_shared(location: Location, node_ids: list[str], timeout_s: float) -> None:
    """Raise :class:`LocationNotShared` unless every node in ``node_ids`` reads the driver's sentinel."""
    token = secrets.token_hex(16)
    name = f".trainmem-sentinel-{token[:12]}"
    location.write_bytes(name, token.encode())
    try:
        refs = {node: _read_sentinel.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(location.uri, location.storage, name) for node in node_ids}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        seen = {}
        for node, ref in refs.items():
            if ref not in ready:
                seen[node] = f"did not answer within {timeout_s:g}s (checkpoint.storage.check_timeout_s)"
                ray.cancel(ref, force=True)
                continue
            try:
                seen[node] = ray.get(ref)
            except ray.exceptions.RayError as e:  # the node died meanwhile
                seen[node] = f"failed ({type(e).__name__})"
    finally:
        location.delete(name)
    bad = {node: got for node, got in seen.items() if got != "token:" + token}
    if bad:
        described = "; ".join(f"node {node[:12]}: sentinel {'is another file' if got.startswith('token:') else got}"
                              for node, got in bad.items())
        kind = "local path" if location.local is not None else "location"
        raise LocationNotShared(
            f"checkpoint.dir={location.uri!r} is a {kind} that {len(bad)} of {len(node_ids)} nodes do not see as "
            f"the driver does ({described}); ranks would restore from different checkpoints "
            "(fix: put checkpoint.dir on a mount every node shares at the same path, or use "
            "checkpoint.dir = \"s3://bucket/prefix\" with [checkpoint.storage])")
