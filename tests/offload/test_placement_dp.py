"""Data parallel over sharded chunks: 2 gloo ranks end bitwise equal to 1 rank doing the same arithmetic
(1 rank with micro_batches=2 reads the two half-batches the 2 ranks read, and adds their gradients in the
same order: rank 0's half, then rank 1's); each rank holds about half of the chunk bytes."""

from __future__ import annotations

import pytest
import torch
from placement_helpers import batches, make_engine, run_ranks, train

from trainmem.offload import PlacementConfig

DEVICE = 300_000  # bytes: the model's params + grads + Adam state are > 4x this
STEPS = 3


def dp_run(rank: int, world: int, micro: int, chunk_bytes: str):
    cfg = PlacementConfig(device_bytes=DEVICE * world, optimizer="torch", micro_batches=micro, chunk_bytes=chunk_bytes)
    engine = make_engine(cfg)
    data = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches(STEPS)]
    losses = train(engine, data)
    full = engine.full_state_dict()
    owned = sum(s.numel for s in engine.layout.slots if s.owner == rank)
    host_param_bytes = engine.layout.n_chunks * engine.layout.shard_bytes
    meta = {"losses": losses, "owned_elems": owned, "total_elems": engine.layout.param_elems,
            "host_param_bytes": host_param_bytes, "stats": {k: v for k, v in engine.last_stats.items()
                                                          if isinstance(v, (int, float))}}
    engine.remove()
    return full, meta


@pytest.mark.slow
def test_two_ranks_bitwise_equal_one_rank_and_half_the_bytes(tmp_path):
    two = run_ranks(dp_run, 2, tmp_path / "w2", 1, "auto")
    one = run_ranks(dp_run, 1, tmp_path / "w1", 2, "auto")
    (p0, m0), (p1, m1) = two
    (q, n) = one[0]
    assert m0["losses"] == m1["losses"] == n["losses"]
    for name in q:
        assert torch.equal(p0[name], q[name]), name
        assert torch.equal(p1[name], q[name]), name
    total = m0["total_elems"]
    for m in (m0, m1):
        assert 0.4 * total <= m["owned_elems"] <= 0.6 * total
        assert m["host_param_bytes"] <= 0.6 * n["host_param_bytes"]
    assert m0["stats"]["moved_network_bytes"] > 0
