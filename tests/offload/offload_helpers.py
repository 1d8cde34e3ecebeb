"""Shared helpers for the offload tests: a tiny GPT step with and without a policy."""

from __future__ import annotations

import torch

from trainmem.offload import ActivationConfig, ActivationPolicy
from trainmem.runtime.models import ModelConfig, build, lm_loss


def batch(cfg: ModelConfig, batch_size: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g)
    return x, y


def run_step(cfg: ModelConfig, act: ActivationConfig | None, *, batch_size: int = 2, rng_seed: int = 5):
    """One forward+backward; returns (loss, grads, policy or None). Dropout draws from ``rng_seed``."""
    model = build(cfg, 0).train()
    x, y = batch(cfg, batch_size)
    policy = None
    if act is not None:
        policy = ActivationPolicy(act, model.blocks)
        policy.plan(lambda: model(x))  # forward-only warm-up is enough to measure
    torch.manual_seed(rng_seed)
    if policy is None:
        loss = lm_loss(model(x), y)
        loss.backward()
    else:
        with policy.step():
            loss = lm_loss(model(x), y)
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, policy
