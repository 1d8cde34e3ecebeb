"""Product-key memory: exact top-k, equality with a plain torch reference, sparse rows, sharding."""

from __future__ import annotations

import copy
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmem.memory_services import (
    ColumnShardedProductKeyMemory,
    ProductKeyConfig,
    ProductKeyMemory,
    build_optimizers,
    memory_parameters,
    product_key_topk,
    value_optimizer,
)
from trainmem.runtime.models import ModelConfig, build, lm_loss


def _brute_topk(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every one of the n_keys**2 slots and take the top-k: the definition."""
    half = keys.shape[-1]
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    return full.topk(k, dim=-1)


def _reference_forward(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """Plain torch: brute-force top-k, fp32 softmax, explicit gather-and-sum of value rows."""
    cfg = layer.cfg
    q = layer.query(x).view(len(x), cfg.heads, cfg.k_dim)
    scores, idx = _brute_topk(q, layer.keys, cfg.topk)
    w = F.softmax(scores.float(), dim=-1).flatten(1)
    rows = layer.values.weight[idx.flatten(1)]  # (N, H*k, v)
    out = (rows * w.unsqueeze(-1)).sum(1)
    if layer.gate is not None:
        out = out * F.silu(layer.gate(x))
    return layer.out(out) if layer.out is not None else out


@settings(max_examples=25, deadline=None)
@given(
    n_keys=st.integers(4, 40),
    heads=st.integers(1, 3),
    half=st.integers(1, 8),
    data=st.data(),
)
def test_topk_equals_brute_force_over_all_slots(n_keys, heads, half, data):
    k = data.draw(st.integers(1, n_keys))
    gen = torch.Generator().manual_seed(n_keys * 100 + heads * 10 + half)
    q = torch.randn(7, heads, 2 * half, generator=gen, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, half, generator=gen, dtype=torch.float64)
    scores, idx = product_key_topk(q, keys, k)
    ref_scores, ref_idx = _brute_topk(q, keys, k)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


@pytest.mark.parametrize("gated", [True, False])
def test_forward_backward_equal_plain_torch_reference(gated):
    torch.manual_seed(0)
    cfg = ProductKeyConfig(d_model=32, heads=2, n_keys=24, k_dim=16, topk=6, gated=gated)
    layer = ProductKeyMemory(cfg).double()
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    w = torch.randn(3, 5, 32, dtype=torch.float64)
    out = layer(x)
    ref_out = _reference_forward(ref, x.view(-1, 32)).view(3, 5, 32)
    torch.testing.assert_close(out, ref_out)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    assert layer.values.weight.grad.is_sparse
    grads = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(g, grads[name].grad, msg=f"grad of {name}")


def test_a_step_touches_only_the_rows_it_read():
    torch.manual_seed(1)
    cfg = ProductKeyConfig(d_model=16, heads=2, n_keys=32, k_dim=8, topk=4)
    layer = ProductKeyMemory(cfg)
    x = torch.randn(6, 16)
    _, idx = layer.lookup(x)
    before = layer.values.weight.detach().clone()
    opt = value_optimizer(layer.value_parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    opt.step()
    changed = (layer.values.weight != before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) == set(idx.flatten().tolist())
    assert len(changed) < cfg.n_slots // 10


def test_gpt_with_memory_layer_trains_with_split_optimizers():
    model = build(ModelConfig(size="tiny", memory_layers=[1]), seed=0)
    assert isinstance(model.blocks[1].mlp, ProductKeyMemory)
    dense, values = memory_parameters(model)
    assert len(values) == 1 and values[0] is model.blocks[1].mlp.values.weight
    opts = build_optimizers(model, lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (4, 33), generator=gen)
    losses = []
    for _ in range(8):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _sharded_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)  # same full layer and inputs on every rank
        cfg = ProductKeyConfig(d_model=16, heads=2, n_keys=16, k_dim=8, topk=4, v_dim=12)
        full = ProductKeyMemory(cfg).double()
        shard = ColumnShardedProductKeyMemory.from_full(full).double()
        x = torch.randn(10, 16, dtype=torch.float64)
        w = torch.randn(10, 16, dtype=torch.float64)
        out_full, out_shard = full(x), shard(x)
        torch.testing.assert_close(out_shard, out_full)
        (out_full * w).sum().backward()
        (out_shard * w).sum().backward()
        cols = slice(rank * 6, rank * 6 + 6)
        full_grads = dict(full.named_parameters())
        for name, p in shard.named_parameters():
            ref = full_grads[name].grad
            ref = ref.to_dense()[:, cols] if name == "values.weight" else ref
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(g, ref, msg=f"rank {rank} grad of {name}")
        # One sparse optimizer step keeps the shard equal to its slice of the full table.
        for layer in (full, shard):
            value_optimizer(layer.value_parameters(), lr=0.05).step()
        torch.testing.assert_close(shard.values.weight, full.values.weight[:, cols])
    finally:
        dist.destroy_process_group()


def test_column_sharded_equals_unsharded_at_world_size_2(tmp_path):
    ctx = mp.start_processes(
        _sharded_worker, args=(2, str(tmp_path / "pg")), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail("sharded ranks 0 and 1 did not finish within 120 s")


def test_row_sparse_adam_equals_torch_sparse_adam():
    torch.manual_seed(2)
    cfg = ProductKeyConfig(d_model=16, heads=2, n_keys=16, k_dim=8, topk=4, gated=False)
    ours, ref = ProductKeyMemory(cfg).double(), None
    ref = copy.deepcopy(ours)
    opt_ours = value_optimizer(ours.value_parameters(), lr=0.01)
    opt_ref = torch.optim.SparseAdam(ref.value_parameters(), lr=0.01)
    for step in range(4):
        x = torch.randn(12, 16, dtype=torch.float64)
        for layer, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad(set_to_none=True)
            layer(x).pow(2).sum().backward()
            opt.step()
        torch.testing.assert_close(ours.values.weight, ref.values.weight, msg=f"step {step}")
