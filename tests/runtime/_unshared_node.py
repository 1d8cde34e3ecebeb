"""Run one Ray worker node (as ray.cluster_utils.Cluster.add_node does) until SIGTERM.

Started by test_no_shared_fs.py inside its own mount namespace: ``python _unshared_node.py GCS REDIS|- CPUS
OBJECT_STORE_BYTES``. (``ray start`` cannot join a 127.0.0.1-only cluster: it needs Ray's cluster mode,
which rewrites 127.0.0.1 to the machine's address.)
"""

import signal
import sys
import time

from ray._private.node import Node
from ray._private.parameter import RayParams

gcs, redis, cpus, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = RayParams(num_cpus=cpus, num_gpus=0, object_store_memory=store, min_worker_port=0, max_worker_port=0,
                   gcs_address=gcs, redis_address=None if redis == "-" else redis, include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs the node's shutdown (kills its raylet)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print(f"node {node.node_id} up", flush=True)
while True:
    time.sleep(1)
