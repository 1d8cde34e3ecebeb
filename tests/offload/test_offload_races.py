"""A saved tensor changed in place is an error under every store, never silently wrong gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainmem.offload import ActivationConfig, ActivationPolicy


class InPlaceAfterSave(nn.Module):
    """sin() saves y, then y is changed in place: autograd alone would raise at backward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 256))

    def forward(self, x):
        y = x * self.w
        z = torch.sin(y)
        y.add_(1.0)
        return z


class Clean(InPlaceAfterSave):
    def forward(self, x):
        return torch.sin(x * self.w)


def _run(blocks, act):
    x = torch.randn(4, 128, 256)
    policy = ActivationPolicy(act, blocks)
    policy.plan(lambda: _forward(blocks, x))
    try:
        with policy.step():
            _forward(blocks, x).sum().backward()
    finally:
        policy.remove()


def _forward(blocks, x):
    for b in blocks:
        x = b(x)
    return x


def test_no_policy_autograd_itself_raises():
    blocks = nn.ModuleList([InPlaceAfterSave()])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _forward(blocks, torch.randn(4, 128, 256)).sum().backward()


@pytest.mark.parametrize("act", [ActivationConfig(activations="offload", alpha=1.0),
                                 ActivationConfig(activations="none")], ids=["offload", "keep"])
def test_in_place_on_saved_tensor_is_detected(act):
    blocks = nn.ModuleList([Clean(), InPlaceAfterSave(), Clean()])
    with pytest.raises(RuntimeError, match="modified (in place while being offloaded|by an in-place operation)"):
        _run(blocks, act)


def test_unsplittable_blocks_offload_whole_and_match():
    """Blocks that are not GPT blocks are offloaded whole; their gradients stay bitwise."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([Clean() for _ in range(3)])
    x = torch.randn(4, 128, 256)
    _forward(blocks, x).sum().backward()
    ref = [b.w.grad.clone() for b in blocks]
    blocks.zero_grad()
    policy = ActivationPolicy(ActivationConfig(activations="offload"), blocks)
    plan = policy.plan(lambda: _forward(blocks, x))
    assert all(r.alpha == 1.0 for r in plan.rows)
    with policy.step():
        _forward(blocks, x).sum().backward()
    assert all(torch.equal(b.w.grad, r) for b, r in zip(blocks, ref))
    assert policy.last_stats["peak_host_saved_bytes"] > 0
    policy.remove()
