"""The B/W split gives exactly the fused backward's gradients, without W redoing B."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainmem.parallel.split_backward import SplitBackward
from trainmem.runtime.models import ModelConfig, build, lm_loss, split_into_stages


def _grads(stage, x, y, split: bool):
    stage.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_()
    loss = lm_loss(stage(xx), y)
    params = list(stage.parameters())
    if not split:
        loss.backward()
        return xx.grad, [p.grad.clone() for p in params], None
    sb = SplitBackward(loss, xx, params)
    gx = sb.input_grad(None)
    assert all(p.grad is None for p in params)  # B computed no weight gradient
    sb.weight_grad()
    assert xx.grad is None  # W did not recompute the input gradient
    return gx, [p.grad.clone() for p in params], sb


def test_split_equals_fused_on_gpt_stage():
    cfg = ModelConfig(size="tiny", n_layer=2, seq_len=8, d_model=32, n_head=2)
    stage = split_into_stages(build(cfg, seed=0).double(), [1, 1])[1]
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    y = torch.randint(0, 256, (2, 8))
    gx_f, pg_f, _ = _grads(stage, x, y, split=False)
    gx_s, pg_s, sb = _grads(stage, x, y, split=True)
    assert sb.safe and len(sb.boundary) >= 6
    assert torch.equal(gx_f, gx_s)
    for a, b in zip(pg_f, pg_s):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_weight_reused_on_both_sides_falls_back_correctly():
    lin = nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = (lin(x) + lin(lin(x))).square().sum()
    sb = SplitBackward(out, x, list(lin.parameters()))
    assert not sb.safe  # the weight also sits under the x side of a boundary node
    gx = sb.input_grad(None)
    sb.weight_grad()
    split = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_()
    (lin(x2) + lin(lin(x2))).square().sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    for a, p in zip(split, lin.parameters()):
        torch.testing.assert_close(a, p.grad)
