"""Whole jobs with in-memory snapshots every step on 4 simulated nodes (ray.cluster_utils.Cluster).

Must-shows: a SIGKILLed trainer (at a random step, after a holder was lost) loses no step and ends
bitwise equal to an uninterrupted run;
losing 2 nodes (ec k=2, m=2) recovers from memory, bitwise equal; losing 3 falls back to the
durable tier and says so in events.jsonl. Plus: a corrupted fragment in shared memory is caught.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from trainmem.checkpoint import (
    SnapshotCoordinator, SnapshotUnavailable, SnapshotWriter, fetch_snapshot, start_holders, unpack,
)
from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from ._toy import state_at

pytestmark = pytest.mark.slow
_MB = 1024 * 1024
STEPS = 50


WORKER_NODES = 4


def _top_up(c: Cluster) -> None:
    """Back to WORKER_NODES worker nodes: tests remove nodes, and a failed one must not leave the next short."""
    missing = WORKER_NODES - len(_worker_nodes(c))
    for _ in range(missing):
        c.add_node(num_cpus=1, object_store_memory=80 * _MB)
    if missing:
        c.wait_for_nodes()


@pytest.fixture(scope="module")
def _module_cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * _MB,
                                                          "include_dashboard": False})
    _top_up(c)
    ray.init(address=c.address, namespace="trainmem-tests", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def cluster(_module_cluster):
    _top_up(_module_cluster)
    return _module_cluster


def _spec(run_dir):
    return load_spec(None, {
        "model": {"size": "tiny"},
        "train": {"steps": STEPS, "batch_size": 8, "lr": 3e-3, "seed": 7, "run_dir": str(run_dir)},
        "cluster": {"workers": 2, "hang_timeout_s": 20.0, "placement": "SPREAD"},
        "checkpoint": {"every_steps": 10, "snapshot_every": 1, "ec": {"k": 2, "m": 2}},
    })


@pytest.fixture(scope="module")
def baseline(_module_cluster, tmp_path_factory):
    return Controller(_spec(tmp_path_factory.mktemp("e2e") / "base")).run()


def _events(spec, prefix=("checkpoint", "restored", "failure", "resumed")):
    return [e for e in read_jsonl(spec.run_dir / "events.jsonl") if e["event"].startswith(prefix)]


def _worker_nodes(c: Cluster):
    return [n for n in c.list_all_nodes() if n is not c.head_node]


def _run_and_remove(cluster, spec, n_remove: int, replacements: int, at_step: int = 15):
    """Run a job in a thread; at ``at_step`` remove ``n_remove`` nodes at once (trainers' nodes first)."""
    controller = Controller(spec)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=controller.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (m := read_jsonl(spec.run_dir / "metrics.jsonl")) or m[-1]["step"] < at_step:
        assert time.monotonic() < deadline and thread.is_alive(), "job did not reach the removal step"
        time.sleep(0.05)
    busy = set(ray.util.placement_group_table(controller.group.pg)["bundles_to_node_id"].values())
    nodes = _worker_nodes(cluster)
    victims = ([n for n in nodes if n.node_id in busy] + [n for n in nodes if n.node_id not in busy])[:n_remove]
    removers = [threading.Thread(target=cluster.remove_node, args=(v,)) for v in victims]
    for t in removers:
        t.start()
    for t in removers:
        t.join(60)
    for _ in range(replacements):  # replacement nodes join (no snapshot on them yet)
        cluster.add_node(num_cpus=1, object_store_memory=80 * _MB)
    thread.join(240)
    assert "result" in out, "job did not finish"
    return out["result"], m[-1]["step"]


def test_remove_two_nodes_recovers_from_memory_bitwise(cluster, baseline, tmp_path):
    spec = _spec(tmp_path / "lose2")
    result, removed_at = _run_and_remove(cluster, spec, n_remove=2, replacements=0)
    assert result.params_sha256 == baseline.params_sha256
    events = _events(spec)
    restored = [e for e in events if e["event"] == "restored"]
    assert restored and all(e["tier"] == "memory" for e in restored), restored
    assert not [e for e in events if e["event"] == "checkpoint.fallback_durable"]
    assert sum(e["event"] == "checkpoint.holder_lost" for e in events) == 2
    # the trainers were at step removed_at or later, and at most two snapshots are in flight (checkpoint.capture)
    assert restored[0]["step"] >= removed_at - 2, "recovered from an in-memory snapshot of the removal time"


def test_remove_three_nodes_falls_back_to_durable(cluster, baseline, tmp_path):
    spec = _spec(tmp_path / "lose3")
    result, _ = _run_and_remove(cluster, spec, n_remove=3, replacements=2)
    assert result.params_sha256 == baseline.params_sha256
    events = _events(spec)
    fallback = [e for e in events if e["event"] == "checkpoint.fallback_durable"]
    assert fallback and "snapshot nodes lost" in fallback[-1]["reason"], events
    restored = [e for e in events if e["event"] == "restored"]
    assert restored[-1]["tier"] in ("durable", "flush")


def _in_thread(controller):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=controller.run()), daemon=True)
    thread.start()
    return thread, out


def _wait_step(spec, thread, step: int) -> None:
    deadline = time.monotonic() + 120
    while not (m := read_jsonl(spec.run_dir / "metrics.jsonl")) or m[-1]["step"] < step:
        assert time.monotonic() < deadline and thread.is_alive(), f"job did not reach step {step}"
        time.sleep(0.05)


def test_a_killed_holder_is_replaced_and_a_trainer_killed_later_loses_no_step(baseline, tmp_path):
    """SIGKILL the home holder of rank 0 (its node lives on): training goes on, a new holder takes its
    place, and a trainer SIGKILLed later, at a random step, restores from memory with no step lost."""
    rank, step = random.randint(0, 1), random.randint(30, STEPS - 5)
    spec = _spec(tmp_path / "holder-kill")
    controller = Controller(spec, inject=InjectedFailure(rank=rank, step=step, kind="kill"))
    thread, out = _in_thread(controller)
    _wait_step(spec, thread, 10)
    holders = controller.snapshots.holders
    rank0_node = ray.util.placement_group_table(controller.group.pg)["bundles_to_node_id"][0]
    victim = holders.index_of_node(rank0_node)
    os.kill(ray.get(holders.handles[victim].ping.remote())["pid"], signal.SIGKILL)
    thread.join(240)
    result = out["result"]
    events = _events(spec)
    lost = [e for e in events if e["event"] == "checkpoint.holder_lost"]
    assert len(lost) == 1 and lost[0]["node_alive"] is True, lost
    assert [e["node"] for e in events if e["event"] == "checkpoint.holder_replaced"] == [rank0_node]
    failures = [e for e in events if e["event"] == "failure_detected"]
    assert [(f["kind"], f["ranks"]) for f in failures] == [("died", [rank])], "only the trainer kill restarted ranks"
    restored = [e for e in events if e["event"] == "restored"]
    assert restored and restored[0]["tier"] == "memory", f"killed rank {rank} at step {step}: {restored}"
    assert restored[0]["step"] == step - 1, f"steps lost: killed rank {rank} at {step}, restored {restored[0]['step']}"
    assert result.restarts == 1
    assert result.params_sha256 == baseline.params_sha256, f"killed rank {rank} at step {step}"


def test_losing_a_node_with_only_a_holder_keeps_training(cluster, baseline, tmp_path):
    spec = _spec(tmp_path / "holder-node")
    controller = Controller(spec)
    thread, out = _in_thread(controller)
    _wait_step(spec, thread, 12)
    busy = set(ray.util.placement_group_table(controller.group.pg)["bundles_to_node_id"].values())
    victim = next(n for n in _worker_nodes(cluster) if n.node_id not in busy)
    cluster.remove_node(victim)
    thread.join(240)
    result = out["result"]
    events = _events(spec)
    lost = [e for e in events if e["event"] == "checkpoint.holder_lost"]
    assert [(e["node"], e["node_alive"]) for e in lost] == [(victim.node_id, False)]
    assert result.restarts == 0 and not [e for e in events if e["event"] == "failure_detected"]
    assert result.params_sha256 == baseline.params_sha256


def test_corrupted_fragment_is_detected_and_decoded_around(cluster):
    """The driver writes; its holders sit on other nodes, so fragments travel through Ray."""
    nodes = _worker_nodes(cluster)[:4]
    k, m, numel = 2, 2, 40_000
    holders = start_holders([n.node_id for n in nodes], "corrupt", keep=2)
    coord = SnapshotCoordinator(holders, world=1, k=k, m=m, keep=2)
    writer = SnapshotWriter(rank=0, holders=holders, home=0, k=k, m=m, on_prepared=coord.on_prepared)
    for step in range(2):
        writer.wait()
        writer.capture(step, state_at(0, step, numel), {"step": step})
    assert writer.flush() == 1 and coord.latest_complete() == 1
    path = ray.get(holders.handles[0].segment_path.remote(1, 0, 0))
    with open(path, "r+b") as f:  # flip bytes of data fragment 0 in the home holder's shared memory
        f.seek(100)
        b = f.read(4)
        f.seek(100)
        f.write(bytes(x ^ 0x5A for x in b))
    snap = fetch_snapshot(holders, 1, 0, home=0)
    assert snap.corrupt and snap.corrupt[0][0] == 0, "checksum must catch the flipped bytes"
    assert 0 in snap.decoded
    out = unpack(snap.buffer, snap.layout)
    assert all(out[n].equal(t) for n, t in state_at(0, 1, numel).items())
    for j, h in ((1, 0), (1, 1), (2, 2)):  # every copy of fragments 1, 2 bad: only fragment 3 left, k=2
        with open(ray.get(holders.handles[h].segment_path.remote(1, 0, j)), "r+b") as f:
            f.write(b"\xff" * 8)
    with pytest.raises(SnapshotUnavailable, match=r"rank 0 step 1: .*fragment 0.*fragment 1"):
        fetch_snapshot(holders, 1, 0, home=0)
    plan = coord.plan_restore()  # the verified inventory sees it too: the older complete step is chosen
    kept = {h: ray.get(handle.inventory.remote()) for h, handle in enumerate(holders.handles)}
    assert plan["source"] == "memory" and plan["step"] == 0, (
        f"plan {plan}; coordinator complete {coord.complete_steps()}; holders' inventories {kept}; "
        f"dead {holders.dead}, suspect {holders.suspect}")
    writer.close()
    holders.close()
    assert not glob.glob("/dev/shm/tmck-corrupt-*")


def test_whole_job_restart_resumes_from_the_flush_tier(cluster, baseline, tmp_path):
    """Snapshots flushed lazily to disk (zstd) let a new launch on the same run dir continue bitwise."""
    first = _spec(tmp_path / "flush")
    first.train.steps, first.checkpoint.every_steps, first.checkpoint.flush_every = 30, 0, 5
    Controller(first).run()
    flushed = [e["step"] for e in _events(first) if e["event"] == "checkpoint.flushed"]
    assert flushed and not [e for e in _events(first) if e["event"] == "checkpoint.flush_failed"]
    again = _spec(tmp_path / "flush")
    again.checkpoint.every_steps, again.checkpoint.flush_every = 0, 5
    result = Controller(again).run()
    restored = [e for e in _events(again) if e["event"] == "restored"]
    assert restored[-1]["tier"] == "flush" and restored[-1]["step"] == max(flushed)
    assert result.params_sha256 == baseline.params_sha256


def test_the_scrub_finds_a_corrupt_fragment_and_it_is_re_encoded_while_snapshots_go_on(cluster, tmp_path):
    from trainmem.checkpoint import CheckpointConfig, ECConfig, RankSnapshots, SnapshotService

    cfg = CheckpointConfig(snapshot_every=1, ec=ECConfig(k=2, m=1), every_steps=0, scrub_every_s=0.3,
                           snapshot_strict=True)
    events: list[tuple[str, dict]] = []
    service = SnapshotService(cfg, world=1, run_dir=tmp_path, checkpoint_dir=tmp_path / "ck",
                              event=lambda name, **kw: events.append((name, kw)))
    service.start()
    rank = RankSnapshots(service.rank_plan(), 0, 1)
    for step in (1, 2):
        rank.capture(step, state_at(0, step, 20_000), {"state": {}})
        rank.writer.flush()
    assert service.poll() == 2
    home = next(h for h in service.holders.alive()
                if ray.get(service.holders.handles[h].segment_path.remote(2, 0, 1)) is not None)
    path = ray.get(service.holders.handles[home].segment_path.remote(2, 0, 1))
    with open(path, "r+b") as f:  # a bit flips in memory under the committed snapshot
        f.seek(1000)
        f.write(b"\xde\xad")
    deadline, step = time.monotonic() + 20, 2
    while not any(n == "checkpoint.fragment_repaired" for n, _ in events):
        assert time.monotonic() < deadline, events
        if step < 3:
            step += 1
            rank.capture(step, state_at(0, step, 20_000), {"state": {}})  # training goes on meanwhile
        service.poll()
        time.sleep(0.2)
    corrupt = [kw for n, kw in events if n == "checkpoint.fragment_corrupt"]
    assert corrupt and corrupt[0]["step"] == 2 and corrupt[0]["fragment"] == 1 and corrupt[0]["found_by"] == "scrub"
    snap = fetch_snapshot(service.holders, 2, 0, home=home)
    assert not snap.corrupt, "re-encoded: every fragment verifies again"
    assert rank.writer.prepared_step == 3
    rank.close()
    service.shutdown()
