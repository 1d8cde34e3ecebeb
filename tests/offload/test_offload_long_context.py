"""Long context: the `small` GPT at 8192 tokens on CPU trains under 25% of its no-policy activation peak."""

from __future__ import annotations

import pytest
import torch

from trainmem.offload import ActivationConfig, ActivationPolicy
from trainmem.runtime.data import open_corpus
from trainmem.runtime.config import DataConfig
from trainmem.runtime.models import ModelConfig, build, lm_loss


@pytest.mark.slow
def test_small_gpt_8k_tokens_trains_under_quarter_budget():
    cfg = ModelConfig(size="small", seq_len=8192)
    model = build(cfg, 0).train()
    x, y = open_corpus(DataConfig()).batch(seed=0, step=0, rank=0, world=1, batch_size=1, seq_len=8192)
    policy = ActivationPolicy(ActivationConfig(activations="auto", activation_budget=0.25), model.blocks)
    plan = policy.plan(lambda: model(x))  # forward-only warm-up: measures saved bytes and times
    assert plan.no_policy_peak > 1_000_000_000  # ~1.3 GB of saved activations with no policy
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with policy.step():
        loss = lm_loss(model(x), y)
        loss.backward()
    opt.step()
    measured = policy.last_stats["peak_saved_bytes"]
    assert measured <= plan.budget_bytes == int(0.25 * plan.no_policy_peak)
    assert abs(plan.predicted_peak - measured) <= 0.10 * measured
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    policy.remove()
