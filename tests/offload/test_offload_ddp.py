"""The policy wraps the blocks of a DDP-wrapped GPT; gradients (after DDP's all-reduce) match."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from offload_helpers import batch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainmem.offload import ActivationConfig, ActivationPolicy, find_blocks
from trainmem.runtime.models import ModelConfig, build, lm_loss

CFG = ModelConfig(size="tiny", dropout=0.1)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("ddp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def _grads(act: ActivationConfig | None):
    model = DDP(build(CFG, 0).train())
    x, y = batch(CFG, 2)
    policy = None
    if act is not None:
        policy = ActivationPolicy(act, find_blocks(model))
        policy.plan(lambda: model(x))
    torch.manual_seed(3)
    if policy is None:
        lm_loss(model(x), y).backward()
    else:
        with policy.step():
            lm_loss(model(x), y).backward()
        policy.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("act", [ActivationConfig(activations="recompute"),
                                 ActivationConfig(activations="offload", alpha=0.5),
                                 ActivationConfig(activations="auto", activation_budget=0.5)],
                         ids=["recompute", "offload-split", "auto"])
def test_ddp_gradients_match(group, act):
    ref = _grads(None)
    got = _grads(act)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def test_find_blocks_looks_through_wrappers(group):
    model = build(CFG, 0)
    assert find_blocks(DDP(model)) is model.blocks
    with pytest.raises(ValueError, match="no 'blocks' ModuleList"):
        find_blocks(torch.nn.Linear(2, 2))
