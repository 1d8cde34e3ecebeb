"""Holders on one embedded Ray node: one deadline for many holders, slow ones come back,
/dev/shm does not leak (dead owners reclaimed, abandoned reservations freed), bytes are capped."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import ray.cloudpickle

from trainmem.checkpoint import (HolderFull, HolderSet, HolderStartError, SnapshotCoordinator, SnapshotHolder,
                                 SnapshotWriter, start_holders)
from trainmem.checkpoint.segments import shm_root

from ._toy import state_at

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    yield ray.get_runtime_context().get_node_id()
    ray.shutdown()


class SlowHolder(SnapshotHolder):
    """A holder that answers votes and commits late while ``slow`` is set (a stalled node, a long GC pause)."""

    slow = 0.0

    def set_slow(self, seconds: float) -> None:
        self.slow = seconds

    def votes(self):
        time.sleep(self.slow)
        return super().votes()

    def commit(self, step, complete=None):
        time.sleep(self.slow)
        return super().commit(step, complete)


def test_one_slow_holder_costs_one_deadline_and_comes_back(local_ray):
    node = local_ray
    names = [f"tmck-slow{os.getpid()}-n{i}" for i in range(3)]
    handles = [ray.remote(SlowHolder).options(name=n, num_cpus=0, max_concurrency=8).remote(n, 2) for n in names]
    holders = HolderSet([node] * 3, handles, list(names), names=list(names))
    ray.get([h.ping.remote() for h in handles])
    coord = SnapshotCoordinator(holders, world=1, k=1, m=1, keep=2, poll_timeout_s=0.5)
    for h in handles:
        ray.get(h.vote.remote(4, 0))
    ray.get(handles[1].set_slow.remote(5.0))
    ray.get(handles[2].set_slow.remote(5.0))
    t0 = time.perf_counter()
    assert coord.collect_votes() == 4, "the answering holder's votes commit the step"
    elapsed = time.perf_counter() - t0
    # votes and commits, each one 0.5 s deadline for all holders together (serially: 4 x 0.5 s or worse)
    assert elapsed < 1.8, f"two slow holders cost {elapsed:.2f}s: they were asked one after another"
    assert holders.suspect == {1, 2} and not holders.dead, "slow is not dead"
    assert holders.writable() == [0]
    ray.get(handles[1].set_slow.remote(0.0))
    time.sleep(5.0)  # let the stalled calls drain
    coord.collect_votes()
    assert 1 not in holders.suspect and 1 in holders.writable(), "a holder that answers again is used again"
    assert ray.get(handles[1].inventory.remote())["committed"] == [4], "the missed commit reached it"
    holders.close()


def test_a_new_holder_reclaims_segments_of_dead_owners_only(local_ray):
    root = shm_root()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for prefix, pid in (("tmck-deadrun-n0", dead.pid), ("tmck-liverun-n0", os.getpid())):
        with open(os.path.join(root, f"{prefix}.owner"), "w") as f:
            start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] if pid == os.getpid() else "1"
            json.dump({"pid": pid, "start": start}, f)
        for name in ("s3-r0-f0", "s3-r0-f1.tmp", "pool-7"):
            with open(os.path.join(root, f"{prefix}-{name}"), "wb") as f:
                f.write(b"x" * 4096)
    with open(os.path.join(root, "tmck-noowner-n2g1-s1-r0-f0"), "wb") as f:  # a crashed driver's, no owner record
        f.write(b"x")
    holders = start_holders([local_ray], "reclaim", keep=1)
    info = ray.get(holders.handles[0].ping.remote())
    assert info["reclaimed_segments"] == 4
    assert not glob.glob(os.path.join(root, "tmck-deadrun-*")) and not glob.glob(os.path.join(root, "tmck-noowner-*"))
    assert len(glob.glob(os.path.join(root, "tmck-liverun-n0-*"))) == 3, "a live owner's segments stay"
    for path in glob.glob(os.path.join(root, "tmck-liverun-n0*")):
        os.unlink(path)
    holders.close()
    assert not glob.glob(os.path.join(root, "tmck-reclaim-*"))


def test_reservations_of_a_writer_that_died_are_freed_and_bytes_stay_accounted(local_ray):
    holders = start_holders([local_ray], "reserve", keep=1)
    h = holders.handles[0]
    paths = ray.get(h.reserve.remote(3, 0, [0, 1], 1 << 20))  # the writer dies before adopt()
    assert all(os.path.exists(p) for p in paths.values())
    assert ray.get(h.ping.remote())["bytes"] == 2 << 20
    ray.get(h.put.remote(5, 1, json.dumps({"checksums": [0]}), [_sum(np.zeros(100, np.uint8))],
                         {0: np.zeros(100, np.uint8)}))
    ray.get(h.commit.remote(5))  # keep=1: everything older than step 5 goes, the orphaned reservation too
    assert not any(os.path.exists(p) for p in paths.values())
    assert ray.get(h.ping.remote())["bytes"] <= (2 << 20) + 100, "freed into the pool, never double counted"
    holders.close()


def test_commits_arriving_out_of_order_keep_both_steps(local_ray):
    """Two snapshots commit back to back from different threads; the newer commit reaching a holder
    first must not free the older step the coordinator still counts as kept (keep=2)."""
    holders = start_holders([local_ray], "ooo", keep=2)
    h = holders.handles[0]
    frag = np.arange(100, dtype=np.uint8)
    for step in (0, 1):
        ray.get(h.put.remote(step, 0, json.dumps({"checksums": [_sum(frag)]}), [_sum(frag)], {0: frag}))
    ray.get(h.commit.remote(1, [0, 1]))  # commit(1) overtakes commit(0)
    ray.get(h.commit.remote(0, [0]))
    inv = ray.get(h.inventory.remote(0))
    assert inv["fragments"] == {"0/0": [0], "1/0": [0]} and sorted(inv["committed"]) == [0, 1]
    holders.close()


def _sum(a):
    from trainmem.checkpoint.segments import checksum

    return checksum(a)


def test_the_byte_cap_is_checked_at_start_and_a_full_holder_skips_the_snapshot(local_ray):
    free = os.statvfs(shm_root())
    with pytest.raises(HolderStartError, match=r"checkpoint.holder_bytes=\d+ but .* bytes free"):
        start_holders([local_ray], "toobig", keep=1, max_bytes=free.f_bavail * free.f_frsize * 4)
    holders = start_holders([local_ray], "capped", keep=1, max_bytes=64 * 1024)
    with pytest.raises(HolderFull, match="cap"):
        ray.get(holders.handles[0].reserve.remote(0, 0, [0], 128 * 1024))
    events: list[tuple[str, dict]] = []
    writer = SnapshotWriter(rank=0, holders=holders, home=0, k=1, m=0, put_timeout_s=10,
                            on_event=lambda name, **kw: events.append((name, kw)))
    writer.capture(0, state_at(0, 0, 20_000))  # ~120 KB: over the 64 KiB cap
    writer.flush()
    assert [n for n, _ in events] == ["snapshot_skipped"] and "cap" in events[0][1]["reason"]
    assert writer.prepared_step is None and not holders.dead, "a full holder is not a dead one"
    writer.close()
    holders.close()

