"""One embedded Ray node: the writer pipeline, a kill mid-snapshot (never torn), the benchmark."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import ray
import torch

from trainmem.checkpoint import SnapshotCoordinator, SnapshotWriter, fetch_snapshot, start_holders, unpack
from trainmem.checkpoint.bench import main as bench_main

from ._toy import ToyTrainer, poll_prepared, state_at, wait_dead

NUMEL = 3_000_000  # 12 MB + 6 MB per rank: the copy and the puts take long enough to be hit


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024)
    yield
    ray.shutdown()


def test_writer_maps_recycled_segments_once_and_commits_in_order(local_ray):
    node = ray.get_runtime_context().get_node_id()
    holders = start_holders([node] * 3, "writer", keep=2)
    coord = SnapshotCoordinator(holders, world=1, k=2, m=1, keep=2)
    writer = SnapshotWriter(rank=0, holders=holders, home=0, k=2, m=1, on_prepared=coord.on_prepared,
                            strict=True)  # wait instead of skipping: this test stores every step
    state = {name: t.clone() for name, t in state_at(0, 0, 10_000).items()}
    steps = 8
    for step in range(steps):
        writer.wait()  # before the "optimizer step" that mutates the state in place
        for name, t in state_at(0, step, 10_000).items():
            state[name].copy_(t)
        writer.capture(step, state, {"step": step})
    assert writer.flush() == steps - 1 and coord.latest_complete() == steps - 1
    # keep=2 plus at most two in flight: the holders recycle a handful of segments, each mapped once.
    assert len(writer._maps._maps) <= 3 * 4, len(writer._maps._maps)
    state_bytes = writer.layout.nbytes
    assert writer.traffic.captured == steps * state_bytes, "each byte of each snapshot copied once"
    assert writer.traffic.parity == 0 and writer.traffic.shipped == 0, "one node: no parity, nothing shipped"
    inv = ray.get(holders.handles[0].inventory.remote())
    assert inv["committed"] == [steps - 2, steps - 1], "keep=2: older snapshots freed"
    assert sorted({key.split("/")[0] for key in inv["fragments"]}) == [str(steps - 2), str(steps - 1)]
    snap = fetch_snapshot(holders, steps - 1, 0, home=0)
    assert snap.layout.m == 0
    out = unpack(snap.buffer, snap.layout)
    assert all(torch.equal(out[n], t) for n, t in state_at(0, steps - 1, 10_000).items())
    assert snap.meta["user"] == {"step": steps - 1} and "torch" in snap.meta["rng"]
    writer.close()
    holders.close()


def _kill_holder(holders, h: int) -> None:
    ray.kill(holders.handles[h])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            ray.get(holders.handles[h].ping.remote(), timeout=2)
        except ray.exceptions.RayError:
            return
        time.sleep(0.1)
    raise TimeoutError("holder still alive")


def test_lost_holder_is_left_out_and_a_step_no_holder_takes_is_skipped(local_ray):
    """Holder trouble never fails training: fragments go to the holders left; with none left, the step is skipped."""
    node = ray.get_runtime_context().get_node_id()
    holders = start_holders([node] * 3, "lost", keep=2)
    events: list[tuple[str, dict]] = []
    writer = SnapshotWriter(rank=3, holders=holders, home=0, k=2, m=1, put_timeout_s=10,
                            on_event=lambda name, **kw: events.append((name, kw)))
    writer.capture(0, state_at(3, 0, 1000))
    assert writer.flush() == 0
    assert ray.get(holders.handles[1].inventory.remote())["fragments"]["0/3"] == [1]
    _kill_holder(holders, 1)  # it kept fragment 1 of every snapshot homed on holder 0
    writer.capture(1, state_at(3, 1, 1000))
    assert writer.flush(timeout_s=20) == 1, "stored on the holders that are left"
    assert 1 in holders.dead and not events
    inv = {h: ray.get(holders.handles[h].inventory.remote())["fragments"].get("1/3") for h in (0, 2)}
    assert inv == {0: [0, 1], 2: [1]}, inv  # re-placed: the next holder takes the lost one's fragment
    snap = fetch_snapshot(holders, 1, 3, home=0)
    assert torch.equal(unpack(snap.buffer, snap.layout)["model.w"], state_at(3, 1, 1000)["model.w"])
    for h in (0, 2):
        _kill_holder(holders, h)
    writer.capture(2, state_at(3, 2, 1000))
    assert writer.flush(timeout_s=20) == 1, "a step no holder could take is never reported stored"
    assert [name for name, _ in events] == ["snapshot_skipped"] and events[0][1]["step"] == 2
    assert "no snapshot holder could store it" in events[0][1]["reason"]
    writer.capture(3, state_at(3, 3, 1000))  # and the writer keeps going: no exception reaches training
    writer.flush(timeout_s=20)
    assert writer.skipped == 2
    writer.close()
    holders.close()


def test_replica_groups_commit_on_one_replica_and_restore_from_it(local_ray):
    """DP replicas: rank 1 died before storing step 2; rank 0's identical snapshot completes it."""
    node = ray.get_runtime_context().get_node_id()
    holders = start_holders([node] * 2, "groups", keep=2)
    coord = SnapshotCoordinator(holders, world=2, k=1, m=1, keep=2, groups=[[0, 1]])
    writers = [SnapshotWriter(rank=r, holders=holders, home=r, k=1, m=1) for r in range(2)]
    for step in range(3):
        state = state_at(0, step, 5_000)  # replicas: the same state on both ranks
        for w in writers[: 2 if step < 2 else 1]:
            w.capture(step, state)
            w.flush()
    for r, w in enumerate(writers):
        coord.on_prepared(r, w.prepared_step)
    assert coord.latest_complete() == 2
    plan = coord.plan_restore()
    assert plan["step"] == 2 and plan["sources"] == {"0": 0, "1": 0}
    snap = fetch_snapshot(holders, 2, int(plan["sources"]["1"]))
    assert torch.equal(unpack(snap.buffer, snap.layout)["model.w"], state_at(0, 2, 5_000)["model.w"])
    for w in writers:
        w.close()
    holders.close()


@pytest.mark.slow
def test_bench_quick_json(local_ray, capsys):
    assert bench_main(["--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("blocked_s", "overhead_ratio", "traffic_per_state_byte", "ec_gbps", "memcpy_gbps", "lost_steps"):
        assert result[key] is not None, key
    assert "overhead_ratio_3dp" in result and "node_loss_recover_s_durable" in result  # full runs only
    assert set(result["blocked_s"]) >= {"ours", "torch_save", "dcp_async"}
    assert result["traffic_per_state_byte"] <= 1.05, "one node: each byte copied once, no parity"
    # Lost steps come from a launched job whose trainer really was SIGKILLed (and seen dead), not the library.
    job = result["jobs"]["snapshot"]
    assert job["killed"]["kind"] == "kill" and job["detected"] == "died" and job["tier"] == "memory"
    assert result["lost_steps"] == job["lost_steps"] == 0
    assert result["jobs"]["disk"]["lost_steps"] > 0, "negative control: the durable tier every 5 steps loses some"


@pytest.mark.slow
def test_kill_mid_snapshot_never_yields_a_torn_restore(local_ray):
    node = ray.get_runtime_context().get_node_id()
    holders = start_holders([node] * 3, "torn", keep=2)
    coord = SnapshotCoordinator(holders, world=2, k=2, m=1, keep=2)
    trainers = {r: ToyTrainer.remote(r, holders, r, 2, 1, NUMEL) for r in range(2)}
    rng = random.Random(1234)
    start = 0
    landed_mid_capture = 0
    for attempt in range(3):  # kill, check, restart from the restored step, kill again
        for t in trainers.values():
            t.run.remote(start, 1000)
        give_up = time.monotonic() + 90
        while (coord.latest_complete() or -1) < start:  # the controller's health poll
            assert time.monotonic() < give_up, "trainers committed nothing within 90 s"
            poll_prepared(coord)
            time.sleep(0.02)
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline:
            poll_prepared(coord)
            time.sleep(0.02)
        victim = trainers[1]
        victim_pid = ray.get(victim.pid.remote(), timeout=10)

        def reserved_by_victim() -> int:
            return sum(ray.get(h.ping.remote())["reserved_by_rank"].get("1", 0) for h in holders.handles)

        aim = time.monotonic() + 10
        while reserved_by_victim() == 0 and time.monotonic() < aim:  # aim the kill inside a capture pass
            pass
        os.kill(victim_pid, signal.SIGKILL)
        wait_dead(victim)
        # Segments the victim had reserved and never handed over: the kill landed inside a capture.
        landed_mid_capture += reserved_by_victim()
        poll_prepared(coord)
        ahead = ray.get(trainers[0].prepared.remote(), timeout=10)
        ray.kill(trainers[0])
        wait_dead(trainers[0])  # no vote of this incarnation may land after the rollback below
        step = coord.latest_complete()
        assert step is not None and step >= start, f"attempt {attempt}: nothing committed"
        assert coord.restorable_step()[0] == step
        for r in range(2):
            snap = fetch_snapshot(holders, step, r, home=r)
            out = unpack(snap.buffer, snap.layout)
            for name, t in state_at(r, step, NUMEL).items():
                assert torch.equal(out[name], t), f"attempt {attempt}: rank {r} step {step} {name} torn"
        # rank 0 may have stored steps past the commit point; they are never chosen
        assert ahead is None or ahead >= step
        coord.rollback(step)  # as the controller does after a restore: holders forget later votes too
        trainers = {r: ToyTrainer.remote(r, holders, r, 2, 1, NUMEL) for r in range(2)}
        start = step + 1
    assert landed_mid_capture > 0, "no kill landed inside a capture: the torn case was not exercised"
    holders.close()


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def test_service_plans_memory_restore_and_reshards_dp_replicas(local_ray, tmp_path):
    """SnapshotService + RankSnapshots without the runtime: 2 DP replicas snapshot, 3 ranks restore."""
    from trainmem.checkpoint import (CheckpointConfig, ECConfig, RankSnapshots, SnapshotService,
                                     flatten_training_state, restore_training_state)

    cfg = CheckpointConfig(snapshot_every=1, ec=ECConfig(k=2, m=1), every_steps=0, snapshot_strict=True)
    events: list[tuple[str, dict]] = []
    service = SnapshotService(cfg, world=2, run_dir=tmp_path, checkpoint_dir=tmp_path / "ck",
                              event=lambda name, **kw: events.append((name, kw)), replica_groups=[[0, 1]])
    service.start()
    assert service.memory_candidates() == []
    model, opt = _model_and_optimizer(0)
    ranks = [RankSnapshots(service.rank_plan(), r, 2) for r in range(2)]
    for step in (1, 2, 3):
        model(torch.randn(8, 16)).square().mean().backward()
        for rs in ranks:
            rs.wait()
        opt.step()
        opt.zero_grad()
        for rs in ranks:
            tensors, meta = flatten_training_state(model, opt)
            rs.capture(step, tensors, {"state": meta})
    for rs in ranks:
        rs.writer.flush()
    assert service.poll() == 3
    candidates = service.memory_candidates()
    assert candidates[0].step == 3 and all(c.tier == "memory" for c in candidates)
    assert any(name == "checkpoint.restore_plan" for name, _ in events)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for new_rank in range(3):  # the world grew to 3: every new rank reads the replica group's state
        fresh, fresh_opt = _model_and_optimizer(1)
        rs = RankSnapshots(service.rank_plan(), new_rank, 3)
        restore_training_state(fresh, fresh_opt, *rs.reader(candidates[0])(0))
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expect.items())
        assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
        rs.close()
    for rs in ranks:
        rs.close()
    service.shutdown()
