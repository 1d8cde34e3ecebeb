"""The host pool is allocated once, never grows, and a full pool is a clear error."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import batch

from trainmem.offload import ActivationConfig, ActivationPolicy, HostPool, HostPoolFull, PlanInfeasible
from trainmem.runtime.models import ModelConfig, build, lm_loss

CFG = ModelConfig(size="tiny", n_layer=3)


def test_pool_alloc_respects_capacity():
    pool = HostPool(10_000)
    ptr = pool.storage_ptr
    off1, a = pool.alloc(4000)
    off2, b = pool.alloc(4000)
    assert off2 >= off1 + 4000 and off2 % 256 == 0
    with pytest.raises(HostPoolFull, match="host pool of 10000 bytes is full"):
        pool.alloc(4000)
    assert pool.used <= pool.capacity
    pool.reset()
    off3, _ = pool.alloc(9000)
    assert off3 == 0 and pool.storage_ptr == ptr  # rewound, same arena


def test_pool_sized_once_and_reused_across_steps():
    model = build(CFG, 0).train()
    x, y = batch(CFG, 2)
    policy = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0), model.blocks)
    plan = policy.plan(lambda: model(x))
    ptr, capacity = policy.pool.storage_ptr, policy.pool.capacity
    assert plan.host_bytes <= capacity
    for _ in range(3):
        with policy.step():
            lm_loss(model(x), y).backward()
        assert policy.pool.storage_ptr == ptr and policy.pool.capacity == capacity
        assert policy.pool.used <= capacity
        assert policy.last_stats["peak_host_saved_bytes"] == plan.host_bytes
    policy.remove()


def test_too_small_pool_is_refused_at_plan_time():
    model = build(CFG, 0).train()
    x, _ = batch(CFG, 2)
    policy = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0, host_pool_bytes=100_000), model.blocks)
    with pytest.raises(PlanInfeasible, match="host_pool_bytes: the pool .* is too small"):
        policy.plan(lambda: model(x))
    policy.remove()


def test_input_larger_than_planned_fills_the_pool_without_growing_it():
    model = build(CFG, 0).train()
    x, y = batch(CFG, 2)
    policy = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0), model.blocks)
    policy.plan(lambda: model(x))
    capacity = policy.pool.capacity
    big_x, big_y = batch(CFG, 8)
    with pytest.raises(HostPoolFull, match="fix: raise memory.host_pool_bytes"):
        with policy.step():
            lm_loss(model(big_x), big_y).backward()
    assert policy.pool.used <= capacity == policy.pool.capacity
    torch.testing.assert_close(policy.pool.arena.numel(), capacity)
    policy.remove()


def test_host_budget_lowers_alpha_memo_rule():
    """MEMO's host-fit rule: with a pool too small for alpha=1 everywhere, alpha drops until it fits."""
    model = build(CFG, 0).train()
    x, y = batch(CFG, 2)
    probe = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0), model.blocks)
    full = probe.plan(lambda: model(x)).host_bytes
    probe.remove()
    policy = ActivationPolicy(ActivationConfig(activations="offload", host_pool_bytes=int(0.7 * full)), model.blocks)
    plan = policy.plan(lambda: model(x))
    assert plan.host_bytes <= int(0.7 * full)
    assert any(r.alpha < 1 for r in plan.rows)
    with policy.step():
        lm_loss(model(x), y).backward()
    assert policy.pool.high_water <= policy.pool.capacity
    policy.remove()


def test_gradient_accumulation_rewinds_the_pool_between_micro_batches():
    model = build(CFG, 0).train()
    x, y = batch(CFG, 2)
    policy = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0), model.blocks)
    policy.plan(lambda: model(x))
    with policy.step():
        for _ in range(3):  # three micro-batches in one optimizer step: each forward+backward completes
            lm_loss(model(x), y).backward()
    assert policy.pool.high_water <= policy.pool.capacity
    policy.remove()


def test_carves_share_the_arena_rewind_alone_and_refuse_to_rewind_under_live_tensors():
    from trainmem.offload import OffloadEngine, SavedBytesMeter

    pool = HostPool(64 << 10)
    first, second = pool.carve(16 << 10), pool.carve(16 << 10)
    assert first.storage_ptr == second.storage_ptr == pool.storage_ptr and pool.used >= 32 << 10
    _, a = first.alloc(16 << 10)
    _, b = second.alloc(16 << 10)
    assert a.data_ptr() + a.numel() <= b.data_ptr()  # disjoint regions of one arena
    with pytest.raises(HostPoolFull):
        first.alloc(1)
    first.reset()
    assert first.used == 0 and second.used == 16 << 10
    # the engine: one forward into a carve; its tensors alive -> no rewind; graph gone -> rewound
    meter = SavedBytesMeter()
    engine = OffloadEngine(pool, meter)
    carve = pool.carve(32 << 10)
    engine.use_pool(carve)
    w = torch.randn(64, 64, requires_grad=True)
    engine.begin_block(0)
    with torch.autograd.graph.saved_tensors_hooks(engine.pack, engine.unpack):
        loss = (torch.randn(16, 64) @ w).tanh().sum()
    engine.end_block()
    assert carve.used > 0 and meter.host_current > 0
    with pytest.raises(RuntimeError, match="still referenced"):
        engine.release_pool(carve)
    loss.backward()
    del loss
    engine.release_pool(carve)
    assert carve.used == 0 and meter.host_current == 0 and w.grad is not None
    engine.close()
