"""How one rank turns a batch into gradients: data-parallel (DDP) or a pipeline schedule.

Both take the activation policy (``[memory]``) around their forward/backward, expose the
parameters this rank optimizes, clip by the global gradient norm, and can bring every rank's
parameters to rank 0 (for hashing and for single-writer checkpoints).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainmem.offload import ActivationConfig, ActivationPolicy
from trainmem.parallel import PipelineConfig, PipelineExecutor, build_schedule, layout_for

from .models import GPT, lm_loss, split_into_stages


def clip_by_total_norm(params: list[torch.nn.Parameter], max_norm: float, *, reduce: bool) -> None:
    """torch's clip over dense grads, with row-sparse grads (memory-layer values) counted too.

    ``reduce`` sums the squared norm over the process group (pipeline ranks each hold a part).
    """
    grads = [p.grad for p in params if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g.coalesce() for g in grads if g.is_sparse]
    if not reduce and not sparse:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # the common case, exactly torch's arithmetic
        return
    norms = [torch.nn.utils.get_total_norm(dense)] if dense else []
    norms += [g.values().norm() for g in sparse]
    sq = torch.stack(norms).double().pow(2).sum() if norms else torch.zeros((), dtype=torch.float64)
    if reduce:
        dist.all_reduce(sq)
    coef = min(1.0, max_norm / (math.sqrt(sq.item()) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def build_policy(cfg: ActivationConfig, model: GPT, warmup_batch: tuple[torch.Tensor, torch.Tensor]) -> ActivationPolicy:
    """Wrap the blocks and plan from one warm-up forward/backward on this rank's raw model."""
    policy = ActivationPolicy(cfg, model.blocks)
    x, y = warmup_batch
    with torch.random.fork_rng(devices=[]):  # the warm-up must not move the RNG the steps draw from
        policy.plan(lambda: lm_loss(model(x), y).backward())
    model.zero_grad(set_to_none=True)
    return policy


class DataParallelEngine:
    """Every rank holds the whole model; DDP averages gradients during backward."""

    def __init__(self, model: GPT, device: torch.device, policy: ActivationPolicy | None):
        self.model, self.policy = model, policy
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.last_stats: dict[str, Any] = {}

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return dist.get_rank(), dist.get_world_size()

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self.policy.step() if self.policy else nullcontext():
            loss = lm_loss(self.ddp(x), y)
            loss.backward()
        self.last_stats = dict(self.policy.last_stats) if self.policy else {}
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean.item() / dist.get_world_size()

    def clip(self, max_norm: float) -> None:
        clip_by_total_norm(self.parameters(), max_norm, reduce=False)

    def gather_to_rank0(self) -> None:
        """DDP replicas are already equal."""


class PipelineEngine:
    """Rank r runs the stages ``[pipeline]`` places on it; every rank reads the same global batch."""

    def __init__(self, model: GPT, cfg: PipelineConfig, policy: ActivationPolicy | None):
        self.model, self.cfg, self.policy = model, cfg, policy
        rank = dist.get_rank()
        layout = layout_for(cfg, len(model.blocks))
        layers = [n for _, n in sorted(s for owned in layout for s in owned)]
        stages = split_into_stages(model, layers)
        self.owned = {s: stages[s] for s, _ in layout[rank]}
        self.owner_of: dict[int, int] = {}  # id(param) -> rank that updates it
        for r, owned in enumerate(layout):
            for s, _ in owned:
                for p in stages[s].parameters():
                    self.owner_of[id(p)] = r
        self.executor = PipelineExecutor(build_schedule(cfg), rank, self.owned, lm_loss, timeout_s=cfg.timeout_s)
        self.last_stats: dict[str, Any] = {}

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return 0, 1  # pure pipeline parallelism: one data-parallel replica

    def parameters(self) -> list[torch.nn.Parameter]:
        rank = dist.get_rank()
        return [p for p in self.model.parameters() if self.owner_of[id(p)] == rank]

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        m = self.cfg.microbatches
        if x.shape[0] % m:
            raise ValueError(f"train.batch_size={x.shape[0]} must be a multiple of pipeline.microbatches={m}")
        microbatches = list(zip(x.chunk(m), y.chunk(m)))
        with self.policy.step() if self.policy else nullcontext():
            stats = self.executor.step(microbatches)
        self.last_stats = {"peak_saved_bytes": stats.peak_bytes, "peak_mb": stats.peak_mb}
        return stats.loss

    def clip(self, max_norm: float) -> None:
        """Clip by the norm over all stages' gradients, as the unpipelined model would."""
        clip_by_total_norm(self.parameters(), max_norm, reduce=True)

    def gather_to_rank0(self) -> None:
        """Rank 0's model copy takes every stage's current parameters (for hashing and saving)."""
        for p in self.model.parameters():
            dist.broadcast(p.data, src=self.owner_of[id(p)])


def build_engine(spec, model: GPT, device: torch.device, warmup_batch) -> DataParallelEngine | PipelineEngine:
    policy = build_policy(spec.memory, model, warmup_batch) if spec.memory.activations != "none" else None
    if spec.pipeline.stages > 1:
        return PipelineEngine(model, spec.pipeline, policy)
    return DataParallelEngine(model, device, policy)
