"""Nodes that share no filesystem: a local checkpoint path is refused with the fix named; on S3 a node loss
falls back to the durable tier, skips a half-written object, and ends bitwise equal to an uninterrupted run.

One node of the cluster is a raylet started in its own mount namespace (``unshare --mount``) with a
private tmpfs over the checkpoint path: it sees a different folder there than the driver does,
as a node of a real cluster without a shared mount would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from trainmem.checkpoint import DurableStore, Location, LocationNotShared
from trainmem.runtime import Controller, load_spec
from trainmem.runtime.runlog import read_jsonl

pytestmark = pytest.mark.slow
_MB = 1024 * 1024
WORLD, STEPS = 3, 14


@pytest.fixture(scope="module")
def private_path(tmp_path_factory):
    """A folder the driver sees, behind a private (empty) tmpfs on the namespaced node."""
    path = tmp_path_factory.mktemp("unshared")
    (path / "driver-only").write_text("the namespaced node cannot see this")
    return path


@pytest.fixture(scope="module")
def cluster(private_path, tmp_path_factory):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * _MB,
                                                      "include_dashboard": False})
    for _ in range(WORLD):  # one more than a job needs beside the namespaced node: room after a node loss
        c.add_node(num_cpus=1, object_store_memory=80 * _MB)
    log = tmp_path_factory.mktemp("unshared-log") / "node.log"
    script = Path(__file__).with_name("_unshared_node.py")
    node = f"{sys.executable} {script} {c.address} {c.redis_address or '-'} 1 {80 * _MB}"
    unshared = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs trainmem-private {private_path} && exec {node}"],
        start_new_session=True, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    ray.init(address=c.address, namespace="trainmem-tests", log_to_driver=False)
    deadline = time.monotonic() + 60
    while sum(n["Alive"] for n in ray.nodes()) < WORLD + 2:
        assert unshared.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    yield c
    ray.shutdown()
    os.killpg(unshared.pid, signal.SIGTERM)
    try:
        unshared.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(unshared.pid, signal.SIGKILL)
        unshared.wait(10)
    c.shutdown()


def _spec(cluster, run_dir, checkpoint_dir, storage=None):
    return load_spec(None, {
        "model": {"size": "tiny"},
        "train": {"steps": STEPS, "batch_size": 8, "lr": 3e-3, "seed": 7, "run_dir": str(run_dir)},
        "cluster": {"address": cluster.address, "workers": WORLD, "cpus_per_worker": 1, "placement": "SPREAD",
                    "hang_timeout_s": 20.0, "recovery": "restart"},
        "checkpoint": {"every_steps": 4, "keep": 3, "dir": str(checkpoint_dir),
                       **({"storage": storage} if storage else {})},
    })


def _storage(s3_server):
    st = s3_server.storage
    return {"endpoint": st.endpoint, "region": st.region, "access_key_id": st.access_key_id,
            "secret_access_key": st.secret_access_key}


def test_a_local_path_some_node_does_not_see_is_refused_naming_the_fix(cluster, private_path, tmp_path):
    spec = _spec(cluster, tmp_path / "run", private_path / "ck")
    t0 = time.monotonic()
    with pytest.raises(LocationNotShared) as refused:
        Controller(spec).run()
    message = str(refused.value)
    assert "1 of 4 nodes" in message and "sentinel missing" in message, message
    assert "shared" in message and "s3://bucket/prefix" in message, "the fix is named"
    assert time.monotonic() - t0 < 30
    events = read_jsonl(spec.run_dir / "events.jsonl")
    assert not any(e["event"] == "workers_started" for e in events), "refused before any rank started"
    assert not any((private_path / "ck").iterdir()), "the sentinel is removed"


def _half_write_when_saved(store: DurableStore, step: int) -> threading.Thread:
    """As soon as ``step``'s manifest is on S3, replace its data object by its first half (a torn upload)."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while step not in store.steps():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        folder = store.location.child(store.step_name(step))
        name = next(iter(store.read_manifest(step)["files"]))
        data = folder.read_bytes(name)
        folder.write_bytes(name, data[: len(data) // 2])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _remove_node_at(cluster, controller, run_dir, step: int, rank: int) -> threading.Thread:
    """Once metrics.jsonl (driver side, fed by the sink) reaches ``step``: remove ``rank``'s node (the spare
    node takes its place; Cluster.add_node cannot run off the main thread)."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while not (m := read_jsonl(run_dir / "metrics.jsonl")) or m[-1]["step"] < step:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        node_id = ray.get(controller.group.actors[rank].node_id.remote(), timeout=10)
        node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
        cluster.remove_node(node)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_on_s3_a_node_loss_restores_from_the_durable_tier_past_a_torn_object_bitwise(cluster, s3_server, tmp_path):
    baseline = Controller(_spec(cluster, tmp_path / "base", s3_server.uri("base"), _storage(s3_server))).run()
    spec = _spec(cluster, tmp_path / "run", s3_server.uri("faulted"), _storage(s3_server))
    store = DurableStore(Location(spec.checkpoint_uri, spec.checkpoint.storage))
    controller = Controller(spec)
    torn = _half_write_when_saved(store, 8)
    # A rank on a node made by Cluster (the namespaced raylet is not Cluster's to remove).
    managed = {n.node_id for n in cluster.list_all_nodes()}
    remover = None
    started = threading.Event()

    def pick_and_remove() -> None:
        while controller.group is None or len(controller.group.actors) < WORLD:
            time.sleep(0.05)
        nodes = ray.get([a.node_id.remote() for a in controller.group.actors], timeout=60)
        rank = next(r for r, n in enumerate(nodes) if n in managed)
        nonlocal remover
        remover = _remove_node_at(cluster, controller, spec.run_dir, 9, rank)
        started.set()

    threading.Thread(target=pick_and_remove, daemon=True).start()
    result = controller.run()
    torn.join(5)
    assert started.wait(1) and remover is not None
    remover.join(30)
    events = read_jsonl(spec.run_dir / "events.jsonl")
    detected = [e for e in events if e["event"] == "failure_detected"]
    assert detected and detected[0]["kind"] in ("died", "error")
    rejected = [e for e in events if e["event"] == "checkpoint_rejected"]
    assert rejected and {(e["tier"], e["step"]) for e in rejected} == {("durable", 8)}, "each reader names it"
    for e in rejected:
        assert f"{spec.checkpoint_uri}/step-00000008/state-" in e["reason"] and "checksum mismatch" in e["reason"]
    restored = [e for e in events if e["event"] == "restored"]
    assert [(e["tier"], e["step"], e["dir"]) for e in restored] == [("durable", 4, spec.checkpoint_uri)]
    assert result.steps == STEPS and result.params_sha256 == baseline.params_sha256
    assert store.load(8).step == 8, "the replay wrote step 8 again, whole"
