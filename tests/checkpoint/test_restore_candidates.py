"""Restore candidates over every tier (no Ray): ordering, verified readers, what a fresh launch refuses."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from trainmem.checkpoint import (Candidate, CheckpointCorrupt, DurableStore, FlushedRank, FlushStore, SnapshotLayout,
                                 disk_candidates, durable_reader, existing_state, flush_reader, ordered)
from trainmem.checkpoint import durable as durable_mod


def _state(step: int) -> dict[str, torch.Tensor]:
    return {"model.w": torch.full((1000,), float(step)), "optim.0.step": torch.tensor(float(step))}


def _save(root, step, keep=5):
    DurableStore(root, keep=keep).save(step, _state(step), {"state": {"step": step}, "world": 2, "seed": 0})


def _flush(root, step, world=2):
    tensors = _state(step)
    layout = SnapshotLayout.plan(tensors, k=2, m=1)
    buf = np.zeros(layout.buffer_len, np.uint8)
    for s in layout.tensors:
        buf[s.offset : s.offset + s.nbytes] = tensors[s.name].reshape(-1).numpy().view(np.uint8)
    FlushStore(root / "snapshots").write(step, {0: FlushedRank(layout, {"user": {"state": {"step": step}}}, buf)}, world)


def test_candidates_are_newest_first_with_the_fastest_tier_first_per_step(tmp_path):
    for step in (5, 10):
        _save(tmp_path, step)
    _flush(tmp_path, 10)
    _flush(tmp_path, 8)
    got = [(c.tier, c.step, c.world) for c in disk_candidates(tmp_path, world=3)]
    assert got == [("flush", 10, 2), ("durable", 10, 2), ("flush", 8, 2), ("durable", 5, 2)]
    mem = [Candidate("memory", 9, 2), Candidate("memory", 11, 2)]
    assert [(c.tier, c.step) for c in ordered(mem + disk_candidates(tmp_path, 2))][:4] == [
        ("memory", 11), ("flush", 10), ("durable", 10), ("memory", 9)]


def test_per_rank_durable_stores_offer_only_steps_every_rank_has(tmp_path):
    for rank, steps in ((0, (5, 10)), (1, (5,))):
        for s in steps:
            _save(tmp_path / f"rank-{rank}", s)
    cands = disk_candidates(tmp_path, 2)
    assert [(c.tier, c.step, c.layout) for c in cands] == [("durable", 5, "per-rank")]
    tensors, meta = durable_reader(tmp_path, cands[0])(1)
    assert meta == {"step": 5} and torch.equal(tensors["model.w"], _state(5)["model.w"])


def test_readers_verify_and_name_the_bad_file(tmp_path):
    _save(tmp_path, 10)
    _flush(tmp_path, 10)
    durable_file = tmp_path / "step-00000010" / "state.safetensors"
    with open(durable_file, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\xff")
    with pytest.raises(CheckpointCorrupt, match=r"step-00000010/state.safetensors: checksum mismatch"):
        durable_reader(tmp_path, Candidate("durable", 10, 2))(0)
    flushed = tmp_path / "snapshots" / "snap-00000010" / "rank-00000.zst"
    os.truncate(flushed, flushed.stat().st_size - 3)
    with pytest.raises(CheckpointCorrupt, match=r"rank-00000.zst: missing or truncated"):
        flush_reader(tmp_path, Candidate("flush", 10, 2))(0)
    with pytest.raises(CheckpointCorrupt, match="no rank 1"):
        flush_reader(tmp_path, Candidate("flush", 10, 2))(1)


def test_a_flush_folder_without_manifest_is_no_candidate_and_raises_no_traceback(tmp_path):
    _flush(tmp_path, 10)
    os.unlink(tmp_path / "snapshots" / "snap-00000010" / "manifest.json")
    assert disk_candidates(tmp_path, 2) == []
    with pytest.raises(CheckpointCorrupt, match="manifest.json: missing"):
        FlushStore(tmp_path / "snapshots").load_manifest_world(10)


@pytest.mark.parametrize("tier", ["durable", "per-rank durable", "flush", "flush marker only"])
def test_existing_state_names_every_tier(tmp_path, tier):
    assert existing_state(tmp_path) == []
    if tier == "durable":
        _save(tmp_path, 5)
    elif tier == "per-rank durable":
        _save(tmp_path / "rank-1", 5)
    elif tier == "flush":
        _flush(tmp_path, 5)
    else:
        (tmp_path / "snapshots").mkdir()
        (tmp_path / "snapshots" / "SNAPSHOT-LATEST").write_text("5")
    found = existing_state(tmp_path)
    assert len(found) == 1 and ("flushed" in found[0]) == tier.startswith("flush")


@pytest.mark.parametrize("crash_at", ["rename into place", "delete old copy"])
def test_saving_a_step_again_never_removes_the_folder_latest_names(tmp_path, monkeypatch, crash_at):
    """A replay re-saves the step LATEST names; a crash in the middle must leave that folder whole."""
    store = DurableStore(tmp_path, keep=3)
    _save(tmp_path, 20)
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst, *a, **k):
        if crash_at == "rename into place" and os.path.basename(dst) == "step-00000020":
            raise RuntimeError("crash")  # delete-then-rename would have deleted the folder by now
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if crash_at == "delete old copy":
            raise RuntimeError("crash")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(durable_mod.os, "replace", replace)
    monkeypatch.setattr(durable_mod.shutil, "rmtree", rmtree)
    try:
        DurableStore(tmp_path, keep=3).save(20, {"model.w": torch.full((1000,), 99.0),
                                                 "optim.0.step": torch.tensor(1.0)}, {"state": {}, "world": 2})
    except RuntimeError:
        pass
    monkeypatch.undo()
    assert store.latest_step() == 20
    loaded = store.load(20)  # whole and verified: the old copy or the new one, never nothing
    assert float(loaded.tensors["model.w"][0]) in (20.0, 99.0)


def test_latest_never_moves_back_when_an_older_step_is_saved_again(tmp_path):
    for step in (10, 20):
        _save(tmp_path, step)
    _save(tmp_path, 10)  # a replay after restoring step 10
    assert DurableStore(tmp_path).latest_step() == 20
    assert DurableStore(tmp_path).steps() == [10, 20]
