"""Library pieces without Ray: layout/RNG round trip, flush tier, resharding, config checks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from trainmem.checkpoint import (
    CheckpointConfig, CheckpointCorrupt, ECConfig, FlushedRank, FlushStore, SnapshotLayout,
    capture_rng_states, flat_shard, reshard_states, restore_rng_states, unpack,
)
from trainmem.checkpoint.layout import tensor_views


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 17, generator=g),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
        "idx": torch.randint(0, 1000, (9,), generator=g),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def _pack(tensors, k=3, m=2):
    layout = SnapshotLayout.plan(tensors, k, m)
    buf = torch.zeros(layout.buffer_len, dtype=torch.uint8)
    for name, view in tensor_views(buf, layout).items():
        view.copy_(tensors[name])
    return layout, buf.numpy()


def test_layout_round_trip_is_bitwise_and_json_only():
    tensors = _tensors(1)
    layout, buf = _pack(tensors)
    assert layout.buffer_len % layout.k == 0 and layout.frag_len % 64 == 0
    again = SnapshotLayout.from_json(json.loads(json.dumps(layout.to_json())))
    out = unpack(buf, again)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def test_rng_states_restore_exactly():
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    states = json.loads(json.dumps(capture_rng_states()))  # must survive JSON
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_states(states)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_flush_store_round_trip_checksums_and_keep(tmp_path):
    store = FlushStore(tmp_path, keep=2)
    for step in (3, 6, 9):
        ranks = {}
        for r in range(2):
            layout, buf = _pack(_tensors(step * 10 + r))
            ranks[r] = FlushedRank(layout, {"step": step, "rank": r}, buf)
        store.write(step, ranks)
    assert store.steps() == [6, 9] and store.latest_step() == 9
    assert not list(tmp_path.glob(".tmp-*")), "no temporary folder left behind"
    snap = store.load()
    assert snap.step == 9 and sorted(snap.ranks) == [0, 1]
    for r in range(2):
        out = unpack(snap.ranks[r].buffer, snap.ranks[r].layout)
        for name, t in _tensors(90 + r).items():
            assert torch.equal(out[name], t)
    manifest = json.loads((tmp_path / "snap-00000009" / "manifest.json").read_text())
    assert manifest["ranks"]["1"]["stored_sha256"] and manifest["ranks"]["1"]["codec"] == "zstd"
    assert manifest["world"] == 2
    # flip one byte of a compressed file: detected, named
    path = tmp_path / "snap-00000009" / "rank-00001.zst"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match="rank-00001.zst"):
        store.load(9)


def test_reshard_dp_and_flat_shards():
    full = torch.arange(10, dtype=torch.float32)
    old = {r: {"replica": torch.full((2,), 7.0), "flat": flat_shard(full, r, 3)} for r in range(3)}
    new = reshard_states(old, 4, flat_numel={"flat": 10})
    assert sorted(new) == [0, 1, 2, 3]
    assert torch.equal(torch.cat([new[r]["flat"] for r in range(4)])[:10], full)
    assert all(new[r]["flat"].numel() == 3 for r in range(4))
    assert all(torch.equal(new[r]["replica"], old[0]["replica"]) for r in range(4))
    back = reshard_states(new, 2, flat_numel={"flat": 10})
    assert torch.equal(torch.cat([back[0]["flat"], back[1]["flat"]]), full)


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match=r"^k=0"):
        ECConfig(k=0)
    with pytest.raises(ValueError, match=r"^flush_every=2"):
        CheckpointConfig(flush_every=2)
    cfg = CheckpointConfig(snapshot_every=1, ec=ECConfig(k=2, m=2), flush_every=5)
    assert cfg.ec.k + cfg.ec.m == 4 and cfg.every_steps == 10


def test_flush_store_writes_raw_bytes_when_zstd_does_not_pay(tmp_path):
    """fp32 noise barely compresses: the first flush measures it and the store keeps raw bytes from then on."""
    store = FlushStore(tmp_path, keep=3, min_ratio=1.5)
    for step in (1, 2):
        layout, buf = _pack({"w": torch.randn(50_000, generator=torch.Generator().manual_seed(step))})
        store.write(step, {0: FlushedRank(layout, {"step": step}, buf)}, world=1)
    assert store.measured_ratio is not None and store.measured_ratio < 1.5 and store.codec == "raw"
    manifest = json.loads((tmp_path / "snap-00000002" / "manifest.json").read_text())
    assert manifest["ranks"]["0"]["codec"] == "raw" and manifest["ranks"]["0"]["file"].endswith(".raw")
    out = unpack(store.load(2).ranks[0].buffer, store.load(2).ranks[0].layout)
    assert torch.equal(out["w"], torch.randn(50_000, generator=torch.Generator().manual_seed(2)))
    path = tmp_path / "snap-00000002" / "rank-00000.raw"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt, match="rank-00000.raw: sha256 mismatch"):
        store.load(2)
    compressible = FlushStore(tmp_path / "zeros", min_ratio=1.5)
    layout, buf = _pack({"w": torch.zeros(50_000)})
    compressible.write(1, {0: FlushedRank(layout, {}, buf)}, world=1)
    assert compressible.codec == "zstd" and compressible.measured_ratio > 100
