"""Shared helpers for the placement tests: a tiny GPT, batches, an unplaced torch reference, and real gloo
process groups over torch.multiprocessing (a FileStore rendezvous: no port is opened)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trainmem.eager_torch import defer_dynamo_import
from trainmem.offload import ChunkedEngine, PlacementConfig
from trainmem.runtime.models import ModelConfig, build, lm_loss

CFG = ModelConfig(size="tiny", n_layer=4)
LR, WD, CLIP = 1e-3, 0.1, 0.5


def batches(steps: int, batch_size: int = 4, seed: int = 1, cfg: ModelConfig = CFG):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g),
             torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g)) for _ in range(steps)]


def torch_reference(data, cfg: ModelConfig = CFG, model=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unplaced model under torch AdamW and clip_grad_norm_."""
    model = model if model is not None else build(cfg, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for x, y in data:
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_engine(cfg: PlacementConfig, model=None, events=None, model_cfg: ModelConfig = CFG) -> ChunkedEngine:
    model = model if model is not None else build(model_cfg, 0)
    return ChunkedEngine(model, cfg, lr=LR, weight_decay=WD, loss_fn=lm_loss, device=torch.device("cpu"),
                         events=events)


def train(engine: ChunkedEngine, data, check=None) -> list[float]:
    losses = []
    for x, y in data:
        losses.append(engine.forward_backward(x, y))
        engine.clip(CLIP)
        engine.optimizer_step()
        if check is not None:
            check(engine)
    return losses


def _entry(rank: int, world: int, root: str, fn_name: str, module: str, args: tuple) -> None:
    defer_dynamo_import()  # as a trainer does: a fresh rank skips importing torch._dynamo
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        import importlib

        fn = getattr(importlib.import_module(module), fn_name)
        tensors, meta = fn(rank, world, *args)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{root}/out-{rank}.safetensors")
        Path(f"{root}/out-{rank}.json").write_text(json.dumps(meta))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, root: Path, *args) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """Run ``fn(rank, world, *args) -> (tensors, json meta)`` on ``world`` gloo ranks; returns each rank's output."""
    root.mkdir(parents=True, exist_ok=True)
    for f in root.glob("rendezvous*"):
        f.unlink()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_entry, args=(world, str(root), fn.__name__, fn.__module__, args), nprocs=world, join=True,
                       start_method="spawn")
    return [(load_file(f"{root}/out-{r}.safetensors"), json.loads(Path(f"{root}/out-{r}.json").read_text()))
            for r in range(world)]
