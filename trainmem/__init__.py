"""trainmem: a distributed training-memory runtime.

The subpackages live in the repository's top-level folders (runtime/, offload/, checkpoint/,
parallel/, memory_services/, launch/) and import as ``trainmem.<folder>``.
"""

import os
import sys

__version__ = "0.1.0"

RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Ray reads this once, when it is imported: "0" keeps every Ray process of an embedded cluster on
# 127.0.0.1 instead of the machine's network address. Joining a multi-node cluster needs "1"; the
# `trainmem` command sets that itself when the job names a cluster address (before importing Ray).
LOOPBACK_DEFAULTED = RAY_CLUSTER_ENV not in os.environ and "ray" not in sys.modules
if LOOPBACK_DEFAULTED:
    os.environ[RAY_CLUSTER_ENV] = "0"


def allow_cluster_addresses() -> bool:
    """Undo the loopback default before Ray is imported (to join a multi-node cluster); True if it could."""
    if "ray" in sys.modules:
        return os.environ.get(RAY_CLUSTER_ENV) != "0"
    if LOOPBACK_DEFAULTED:
        os.environ[RAY_CLUSTER_ENV] = "1"
    return os.environ.get(RAY_CLUSTER_ENV) != "0"


def is_loopback_address(address: str) -> bool:
    """True for a Ray address on this machine's loopback ('auto' counts: it finds a local cluster)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1", "auto")
