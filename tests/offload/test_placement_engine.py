"""ChunkedEngine on one rank: a GPT whose params + grads + AdamW state are >= 4x device_bytes trains with the
losses and final parameters of the unplaced model under torch AdamW (bitwise with the same kernel), with and
without the disk tier; the arena and host pool never pass their budgets, and layers only ever compute on
parameters that live in the arena."""

from __future__ import annotations

import pytest
import torch
from placement_helpers import CFG, CLIP, LR, WD, batches, make_engine, torch_reference, train

from trainmem.offload import PlacementConfig, PlacementInfeasible, operators
from trainmem.runtime.models import GPT, build, lm_loss

DEVICE = 600_000


def _state_bytes(model_cfg=CFG) -> int:
    return 16 * build(model_cfg, 0).num_params()  # fp32 params + grads + exp_avg + exp_avg_sq


def _guard_residency(engine) -> list[int]:
    """A forward pre-hook after the engine's on every operator: its parameters must lie in the arena."""
    seen = []

    def check(module, args):
        for p in module.parameters(recurse=False):
            assert engine.arena.contains(p.data), f"{type(module).__name__} computes on memory outside the arena"
            assert not torch.isnan(p.data).any()
        seen.append(1)

    for op in operators(engine.model):
        op.register_forward_pre_hook(check)
    return seen


@pytest.mark.parametrize("disk", [False, True])
def test_trains_bitwise_equal_to_torch_adamw(tmp_path, disk):
    assert _state_bytes() >= 4 * DEVICE
    host = 2 << 20 if disk else None
    cfg = PlacementConfig(device_bytes=DEVICE, optimizer="torch", host_bytes=host,
                          disk_path=str(tmp_path) if disk else "", disk_bytes="64MiB" if disk else None)
    data = batches(4)
    ref_losses, ref_params = torch_reference(data)
    engine = make_engine(cfg)
    if disk:
        assert "disk" in engine.plan.homes.values()
        assert engine.disk.path.stat().st_size > 0
    seen = _guard_residency(engine)
    peaks = []

    def check(e):
        assert e.arena.allocated_bytes <= DEVICE
        assert e.last_stats["arena_peak_bytes"] <= DEVICE
        assert e.arena.n_slots < e.layout.n_chunks  # the arena cannot hold the model: chunks really move
        if host is not None:
            assert e.pool.high_water <= host
        peaks.append(e.last_stats["arena_peak_bytes"])
        assert e.last_stats["moved_host_to_device_bytes"] >= e.layout.n_chunks * e.layout.shard_bytes
        if disk:
            assert e.last_stats["moved_disk_to_host_bytes"] > 0 and e.last_stats["moved_host_to_disk_bytes"] > 0

    losses = train(engine, data, check)
    assert seen and len(peaks) == len(data)
    assert losses == ref_losses
    got = engine.full_state_dict()
    for name, value in ref_params.items():
        assert torch.equal(got[name], value), name
    engine.remove()


def test_fused_kernel_bitwise_equal_to_torch_fused_adamw():
    data = batches(3)
    model = build(CFG, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    for x, y in data:
        lm_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="torch_fused"))
    train(engine, data)
    got = engine.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_deepspeed_cpu_adam_kernel_close_to_torch():
    """DeepSpeedCPUAdam is another kernel: losses within rel 1e-6, parameters within 1e-5 of max |p| (5 steps)."""
    data = batches(5)
    ref_losses, ref_params = torch_reference(data)
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="deepspeed"))
    assert engine.optimizer.kernel == "deepspeed"
    losses = train(engine, data)
    assert max(abs(a - b) / abs(a) for a, b in zip(losses, ref_losses)) <= 1e-6
    got = engine.full_state_dict()
    assert max(((got[k] - v).abs().max() / v.abs().max()).item() for k, v in ref_params.items()) <= 1e-5
    assert not all(torch.equal(got[k], v) for k, v in ref_params.items())  # really another kernel


class OrderSwitchingGPT(GPT):
    """On odd calls blocks 0 and 1 run swapped: a data-independent but step-dependent operator order."""

    calls = 0

    def forward(self, idx):
        order = list(range(len(self.blocks)))
        if self.calls % 2:
            order[0], order[1] = 1, 0
        self.calls += 1
        x = self.embed(idx)
        for i in order:
            x = self.blocks[i](x)
        return self.head(x)


def _switching(seed: int = 0) -> OrderSwitchingGPT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OrderSwitchingGPT(CFG)


def test_operator_order_change_retraces_and_keeps_training():
    data = batches(4)
    ref_losses, ref_params = torch_reference(data, model=_switching())
    events = []
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="torch"), model=_switching(),
                         events=lambda name, **f: events.append((name, f)))
    policies = []
    losses = train(engine, data, lambda e: policies.append(e.last_stats["placement_policy"]))
    retraces = [f for name, f in events if name == "placement_retrace"]
    assert [f["step"] for f in retraces] == [2, 3, 4]  # every step after the warm-up saw the other order
    assert all(f["expected"] != f["got"] for f in retraces)
    assert policies == ["lru", "lru", "lru", "lru"]  # the trace never matched: LRU, never an exception
    assert losses == ref_losses
    got = engine.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref_params.items())


def test_steady_order_uses_the_trace():
    engine = make_engine(PlacementConfig(device_bytes=DEVICE, optimizer="torch"))
    policies, fetches = [], []

    def check(e):
        policies.append(e.last_stats["placement_policy"])
        fetches.append(e.last_stats["chunk_fetches"])

    train(engine, batches(3), check)
    assert policies == ["lru", "belady", "belady"]
    assert fetches[1] <= fetches[0]


def test_device_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(PlacementInfeasible) as err:
        make_engine(PlacementConfig(device_bytes=40_000, optimizer="torch"))
    assert err.value.key == "placement.device_bytes"
    assert f"smallest value that works is {err.value.smallest}" in str(err.value)
    engine = make_engine(PlacementConfig(device_bytes=err.value.smallest, optimizer="torch"))
    train(engine, batches(1))
    assert engine.last_stats["arena_peak_bytes"] <= err.value.smallest


def test_memory_layers_are_refused():
    from trainmem.runtime.models import ModelConfig

    with pytest.raises(ValueError, match="memory_layers"):
        make_engine(PlacementConfig(device_bytes=DEVICE), model=build(ModelConfig(size="tiny", memory_layers=[0]), 0))
