"""Product-key memory: exact top-k, equality with a plain torch reference, sparse rows, sharding."""

from __future__ import annotations

import copy
import json
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
    RowSparseAdam,
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
    k = data.draw(st.integers(1, n_keys))  # float64: the kernel's exact path (and torch's off CPU)
    gen = torch.Generator().manual_seed(n_keys * 100 + heads * 10 + half)
    q = torch.randn(7, heads, 2 * half, generator=gen, dtype=torch.float64)
    keys = torch.randn(heads, 2, n_keys, half, generator=gen, dtype=torch.float64)
    scores, idx = product_key_topk(q, keys, k)
    ref_scores, ref_idx = _brute_topk(q, keys, k)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


def _torch_select(q, keys, k):
    """The reference: torch.topk per half, the candidate pairs, torch.topk again."""
    from trainmem.memory_services.layers.product_key import _candidate_pairs

    h, _, n_keys, half = keys.shape
    scores = torch.bmm(q.reshape(len(q), h * 2, half).transpose(0, 1), keys.reshape(h * 2, n_keys, half).transpose(1, 2))
    v, i = scores.float().topk(k, dim=-1)
    v, i = v.view(h, 2, len(q), k), i.view(h, 2, len(q), k)
    ci, cj = _candidate_pairs(k)
    best_scores, best = (v[:, 0].index_select(-1, ci) + v[:, 1].index_select(-1, cj)).topk(k, dim=-1)
    return best_scores, i[:, 0].gather(-1, ci[best]) * n_keys + i[:, 1].gather(-1, cj[best])


@settings(max_examples=30, deadline=None)
@given(n_keys=st.sampled_from([16, 32, 48, 64, 128, 512]), k=st.sampled_from([1, 5, 16, 32]),
       heads=st.integers(1, 4), seed=st.integers(0, 10**6), bf16=st.booleans())
def test_cpu_kernel_selects_the_same_slots_as_torch_topk(n_keys, k, heads, seed, bf16):
    from trainmem.memory_services.layers import pk_select

    assert pk_select.kernel() is not None, "the CPU selection kernel did not build on this machine"
    k = min(k, n_keys)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(37, heads, 16, generator=gen)
    keys = torch.randn(heads, 2, n_keys, 8, generator=gen)
    if bf16:  # the bf16 path: bf16 scores, float32 selection
        q, keys = q.bfloat16(), keys.bfloat16()
    scores, idx = product_key_topk(q, keys, k)
    ref_scores, ref_idx = _torch_select(q, keys, k)
    torch.testing.assert_close(scores.float(), ref_scores.permute(1, 0, 2), rtol=1e-6, atol=1e-6)
    if not bf16:
        assert torch.equal(idx.sort(-1).values, ref_idx.permute(1, 0, 2).sort(-1).values)
    # Every slot reported carries its own score (bf16 ties may pick other, equally good slots).
    half = torch.bmm(q.reshape(37, heads * 2, 8).transpose(0, 1), keys.reshape(heads * 2, n_keys, 8).transpose(1, 2))
    half = half.float().view(heads, 2, 37, n_keys).permute(2, 0, 1, 3)
    own = half[:, :, 0].gather(-1, idx // n_keys) + half[:, :, 1].gather(-1, idx % n_keys)
    torch.testing.assert_close(own, scores.float(), rtol=1e-6, atol=1e-6)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all() if k > 1 else True  # no slot twice


def test_bf16_layer_reads_the_slots_fp32_reads():
    torch.manual_seed(3)
    cfg = ProductKeyConfig(d_model=128, heads=4, n_keys=128, k_dim=64, topk=16, gated=False)
    fp32 = ProductKeyMemory(cfg)
    with torch.no_grad():  # bf16-representable parameters and inputs: only the arithmetic differs
        for p in fp32.parameters():
            p.copy_(p.bfloat16().float())
    bf16 = copy.deepcopy(fp32).bfloat16()
    x = torch.randn(512, 128).bfloat16()
    with torch.no_grad():
        _, idx32 = fp32.lookup(x.float())
        weights16, idx16 = bf16.lookup(x)
        out16, out32 = bf16(x), fp32(x.float())
    assert weights16.dtype == torch.float32  # softmax in float32
    per_query = (idx32.view(512, 4, 16).sort(-1).values == idx16.view(512, 4, 16).sort(-1).values).all(-1)
    shared = (idx16.view(512, 4, 16, 1) == idx32.view(512, 4, 1, 16)).any(-1).float().mean().item()
    assert shared >= 0.99, shared  # fraction of the slots fp32 reads that bf16 reads too
    assert per_query.float().mean().item() >= 0.6  # whole (token, head) sets: near-ties flip in bf16
    assert torch.nn.functional.cosine_similarity(out16.float(), out32, dim=-1).mean() > 0.99


def test_active_row_gradient_equals_the_dense_gradient():
    torch.manual_seed(4)
    cfg = ProductKeyConfig(d_model=16, heads=2, n_keys=16, k_dim=8, topk=4, gated=True)
    sparse = ProductKeyMemory(cfg).double()
    dense = copy.deepcopy(sparse)
    dense.cfg = ProductKeyConfig(**{**cfg.__dict__, "sparse": False})
    x = torch.randn(30, 16, dtype=torch.float64)
    sparse(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    g = sparse.values.weight.grad
    rows = g._indices()[0]
    assert g.is_sparse and torch.equal(rows, torch.unique(sparse.lookup(x)[1]))  # one entry per row read, sorted
    torch.testing.assert_close(g.to_dense(), dense.values.weight.grad)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if name != "values.weight":
            torch.testing.assert_close(p.grad, q.grad, msg=name)


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


def test_row_sparse_adam_is_torch_adam_on_the_rows_present():
    torch.manual_seed(2)
    table = torch.nn.Parameter(torch.randn(50, 6, dtype=torch.float64))
    ref = torch.nn.Parameter(table.detach().clone())
    ours = RowSparseAdam([table], lr=0.01)
    state = {}  # reference: per-row torch.optim.Adam arithmetic, moments only for rows present (lazy)
    for step in range(1, 6):
        rows = torch.randperm(50)[:12].sort().values
        grad = torch.randn(12, 6, dtype=torch.float64)
        table.grad = torch.sparse_coo_tensor(rows[None], grad, table.shape, check_invariants=True).coalesce()
        if step % 2:  # uncoalesced (as from data-parallel ranks): duplicates are summed
            half = grad / 2
            table.grad = torch.sparse_coo_tensor(torch.cat([rows, rows])[None], torch.cat([half, half]), table.shape,
                                                 check_invariants=True)
        ours.step()
        m, v = state.setdefault("m", torch.zeros_like(ref)), state.setdefault("v", torch.zeros_like(ref))
        with torch.no_grad():
            m[rows] = 0.9 * m[rows] + 0.1 * grad
            v[rows] = 0.999 * v[rows] + 0.001 * grad * grad
            denom = (v[rows].sqrt() / (1 - 0.999**step) ** 0.5) + 1e-8
            ref[rows] -= 0.01 / (1 - 0.9**step) * m[rows] / denom
        torch.testing.assert_close(table.detach(), ref.detach(), msg=f"step {step}")
    assert ours.state[table]["step"].item() == 5


def test_row_sparse_adam_state_round_trips_through_a_checkpoint():
    from trainmem.checkpoint.state import flatten_training_state, restore_training_state

    torch.manual_seed(5)
    cfg = ProductKeyConfig(d_model=16, heads=2, n_keys=16, k_dim=8, topk=4, gated=False)
    a = ProductKeyMemory(cfg)
    opt_a = value_optimizer(a.value_parameters(), lr=0.05)
    x = torch.randn(8, 16)
    for _ in range(2):
        opt_a.zero_grad(set_to_none=True)
        a(x).pow(2).sum().backward()
        opt_a.step()
    tensors, meta = flatten_training_state(a, opt_a)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from a file: no aliasing
    b = ProductKeyMemory(cfg)
    opt_b = value_optimizer(b.value_parameters(), lr=0.05)
    restore_training_state(b, opt_b, tensors, json.loads(json.dumps(meta)))
    for layer, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(a.values.weight, b.values.weight)
