"""How one rank turns a batch into an optimizer step: data parallel or a pipeline schedule.

Every engine offers the worker the same small surface (:class:`Engine`): forward/backward, clip,
the optimizer step, and its state for checkpoints. The worker never touches the optimizer or the
gradient reduction itself, so an engine that shards state (chunked placement, ZeRO) fits the same
loop and the same checkpoint tiers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from trainmem.checkpoint.state import flatten_training_state, restore_training_state
from trainmem.offload import ActivationConfig, ActivationPolicy, ChunkedEngine
from trainmem.parallel import (DeepSpeedEngine, PipelineConfig, PipelineExecutor, PipelineMesh, PipelinePolicy, build_measured_schedule,
                               build_schedule, layout_for,
                               mesh_groups)

from .grad_sync import BucketedAllReduce, all_reduce_within, sparse_grad_parameters
from .models import GPT, lm_loss, split_into_stages
from .optim import build_optimizer

StateReader = Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Any]]]


class Engine(Protocol):
    last_stats: dict[str, Any]
    """Merged into each step's metrics record."""
    replica_group_key: str
    """Ranks with equal keys hold identical state (one of them saves it)."""

    @property
    def data_rank_world(self) -> tuple[int, int]: ...
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float: ...
    def clip(self, max_norm: float) -> None: ...
    def optimizer_step(self) -> None: ...
    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...
    def load_checkpoint(self, read: StateReader, saved_world: int) -> None: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
    def on_new_group(self) -> None:
        """The process group was formed again (a lost peer was replaced): drop per-group state."""


def clip_by_total_norm(params: list[torch.nn.Parameter], max_norm: float, *, reduce: bool, group=None,
                       timeout_s: float = 60.0) -> None:
    """torch's clip over dense grads, with row-sparse grads (memory-layer values) counted too.

    ``reduce`` sums the squared norm over ``group`` (pipeline ranks each hold a part of the model).
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
        work = all_reduce_within(sq, timeout_s, group)
        if not work.wait(timedelta(seconds=timeout_s)):
            raise RuntimeError(f"gradient-norm all-reduce did not complete within {timeout_s:g}s")
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


class _ModelOptimizerState:
    """Checkpoint state of an engine that keeps a whole model plus its optimizer (DDP, pipeline)."""

    model: GPT
    optimizer: Any

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return flatten_training_state(self.model, self.optimizer)

    def _load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_training_state(self.model, self.optimizer, tensors, meta)
        self.optimizer.zero_grad(set_to_none=True)  # a rank that rejoins may hold half a step's gradients

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class DataParallelEngine(_ModelOptimizerState):
    """Every rank holds the whole model; gradients are averaged in fixed buckets (deterministic)."""

    replica_group_key = "data-parallel"

    def __init__(self, model: GPT, policy: ActivationPolicy | None, train_cfg, timeout_s: float):
        self.model, self.policy = model, policy
        params = list(model.parameters())
        self.timeout_s = timeout_s
        self.reducer = BucketedAllReduce(params, sparse=sparse_grad_parameters(model), timeout_s=timeout_s)
        self.optimizer = build_optimizer(model, params, train_cfg)
        self.last_stats: dict[str, Any] = {}

    def on_new_group(self) -> None:
        self.reducer.abandon()  # collectives of the old group that never completed

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return dist.get_rank(), dist.get_world_size()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self.policy.step() if self.policy else nullcontext():
            loss = lm_loss(self.model(x), y)
            loss.backward()
        self.reducer.finish()
        self.last_stats = dict(self.policy.last_stats) if self.policy else {}
        mean = loss.detach().clone()
        all_reduce_within(mean, self.timeout_s).wait(timedelta(seconds=self.timeout_s))
        return mean.item() / dist.get_world_size()

    def clip(self, max_norm: float) -> None:
        clip_by_total_norm(list(self.model.parameters()), max_norm, reduce=False)

    def load_checkpoint(self, read: StateReader, saved_world: int) -> None:
        self._load(*read(0))  # replicas: one saved copy serves every rank at any world size


class PipelineEngine(_ModelOptimizerState):
    """Pipeline × data parallel: ``cfg.stages`` pipeline ranks times ``replicas`` copies of the pipeline.

    Rank r runs the stages ``[pipeline]`` places on its pipeline rank; each replica reads its own
    batches; after a stage's last W its gradients are averaged over the stage's data-parallel group
    (fixed buckets, the same order on every replica); clipping sums the norm over the pipeline.
    """

    def __init__(self, model: GPT, cfg: PipelineConfig, memory: ActivationConfig, train_cfg, *,
                 warmup_batch: tuple[torch.Tensor, torch.Tensor] | None = None, replicas: int = 1,
                 timeout_s: float = 60.0):
        self.model, self.cfg = model, cfg
        self.replicas, self.timeout_s = replicas, timeout_s
        self.mesh = PipelineMesh.build(cfg.stages, replicas, timeout_s=timeout_s)
        self.replica_group_key = f"pipeline-stage-rank-{self.mesh.pipeline_rank}"
        layout = layout_for(cfg, len(model.blocks))
        layers = [n for _, n in sorted(s for owned in layout for s in owned)]
        stages = split_into_stages(model, layers)
        self.owned = {s: stages[s] for s, _ in layout[self.mesh.pipeline_rank]}
        self.owner_of: dict[int, int] = {}  # id(param) -> pipeline rank that updates it
        for r, owned in enumerate(layout):
            for s, _ in owned:
                for p in stages[s].parameters():
                    self.owner_of[id(p)] = r
        self.optimizer = build_optimizer(model, self._mine(), train_cfg)
        self.last_stats: dict[str, Any] = {}
        self.schedule, self.measured = self._measured_schedule(layout, warmup_batch)
        self.policy = self._plan_policy(memory, warmup_batch) if memory.activations != "none" else None
        self._group_state()

    def _measured_schedule(self, layout, warmup_batch):
        """The schedule; with pipeline.offload = "selective", the stashes to offload chosen from this
        rank's measurements at start (layer costs of one microbatch and the copy bandwidth). Ranks may
        choose differently: offloads never change anyone's sends and receives."""
        if self.cfg.offload != "selective":
            return build_schedule(self.cfg), {}
        if warmup_batch is None:
            raise ValueError("pipeline.offload='selective' needs a warm-up batch to measure costs at start")
        x, y = (t[: t.shape[0] // self.cfg.microbatches] for t in warmup_batch)
        model = self.model
        layers = [("embed", model.embed)] + [(f"block{i}", b) for i, b in enumerate(model.blocks)] + [("head", model.head)]
        counts = {s: n for owned in layout for s, n in owned}
        with torch.random.fork_rng(devices=[]):
            out = build_measured_schedule(self.cfg, layers, lambda: lm_loss(model(x), y), exclude=[x, y],
                                          layers_per_stage=[counts[s] for s in sorted(counts)])
        model.zero_grad(set_to_none=True)
        return out

    def _plan_policy(self, memory: ActivationConfig, warmup_batch) -> PipelinePolicy:
        """The activation policy over this rank's blocks, planned for its schedule's microbatches in
        flight from one warm-up microbatch through the whole model (every rank holds all of it)."""
        if warmup_batch is None:
            raise ValueError(f"memory.activations={memory.activations!r} in a pipeline needs a warm-up batch")
        x, y = (t[: t.shape[0] // self.cfg.microbatches] for t in warmup_batch)
        block_ids = {id(b) for b in self.model.blocks}
        stage_blocks = {s: [m for m in mod if id(m) in block_ids] for s, mod in self.owned.items()}

        def warmup() -> None:
            with torch.random.fork_rng(devices=[]):  # the warm-up must not move the RNG the steps draw from
                lm_loss(self.model(x), y).backward()

        policy = PipelinePolicy.plan(memory, stage_blocks, self.schedule.ranks[self.mesh.pipeline_rank],
                                     warmup, rank=self.mesh.pipeline_rank)
        self.model.zero_grad(set_to_none=True)
        return policy

    def _group_state(self) -> None:
        """What belongs to one process group: the executor (posted p2p, stashes) and the reducers."""
        mesh = self.mesh
        self.reducers = {s: BucketedAllReduce(list(mod.parameters()), sparse=sparse_grad_parameters(mod),
                                              group=mesh.data_group, timeout_s=self.timeout_s, hooks=False)
                         for s, mod in sorted(self.owned.items())} if self.replicas > 1 else {}
        self.executor = PipelineExecutor(self.schedule, mesh.pipeline_rank, self.owned, lm_loss,
                                         group=mesh.pipeline_group, timeout_s=self.cfg.timeout_s,
                                         on_stage_done=self._stage_done, stash_hooks=self.policy)

    def on_new_group(self) -> None:
        """Posted sends/receives, stashes and the mesh's groups belong to the old process group."""
        for reducer in self.reducers.values():
            reducer.abandon()
        self.mesh = PipelineMesh.build(self.cfg.stages, self.replicas, timeout_s=self.timeout_s)
        self._group_state()

    def _stage_done(self, stage: int) -> None:
        if stage in self.reducers:
            self.reducers[stage].launch()

    @property
    def data_rank_world(self) -> tuple[int, int]:
        return self.mesh.replica, self.replicas

    def _mine(self) -> list[torch.nn.Parameter]:
        rank = self.mesh.pipeline_rank
        return [p for p in self.model.parameters() if self.owner_of[id(p)] == rank]

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        m = self.cfg.microbatches
        if x.shape[0] % m:
            raise ValueError(f"train.batch_size={x.shape[0]} must be a multiple of pipeline.microbatches={m}")
        microbatches = list(zip(x.chunk(m), y.chunk(m)))
        with self.policy.step() if self.policy else nullcontext():
            stats = self.executor.step(microbatches)
        for stage in sorted(self.reducers):  # the same order on every replica
            self.reducers[stage].finish()
        self.last_stats = {"peak_saved_bytes": stats.peak_bytes, "peak_mb": stats.peak_mb}
        if self.policy is not None:  # the blocks' saved bytes are the policy's; the stashes hold the rest
            self.last_stats = {**self.policy.last_stats, "peak_stash_bytes": stats.peak_bytes}
        return self._mean_over_replicas(stats.loss)

    def _mean_over_replicas(self, loss: float) -> float:
        if self.replicas == 1:
            return loss
        t = torch.tensor([loss], dtype=torch.float64, device=next(self.model.parameters()).device)
        work = all_reduce_within(t, self.timeout_s, self.mesh.data_group)
        if not work.wait(timedelta(seconds=self.timeout_s)):
            raise RuntimeError(f"loss all-reduce over ranks {self.mesh.data_ranks} did not complete in {self.timeout_s:g}s")
        return float(t.item()) / self.replicas

    def clip(self, max_norm: float) -> None:
        """Clip by the norm over all stages' gradients, as the unpipelined model would (every replica
        holds the same averaged gradients, so each pipeline computes the same norm)."""
        clip_by_total_norm(self._mine(), max_norm, reduce=True, group=self.mesh.pipeline_group,
                           timeout_s=self.timeout_s)

    def load_checkpoint(self, read: StateReader, saved_world: int) -> None:
        """Each stage's state from the lowest rank of that stage's group in the saved job (any replica
        count: the replicas of a stage hold the same state)."""
        stages = self.cfg.stages
        if saved_world % stages:
            raise ValueError(f"a checkpoint of {saved_world} ranks cannot hold {stages} pipeline stages "
                             f"(its world is not stages x replicas)")
        self._load(*read(self.mesh.pipeline_rank * (saved_world // stages)))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's current parameters, brought to every rank's model copy (collective)."""
        for p in self.model.parameters():
            dist.broadcast(p.data, src=self.mesh.global_rank(self.owner_of[id(p)]), group=self.mesh.pipeline_group)
        return self.model.state_dict()


def replica_groups(spec) -> list[list[int]]:
    """Ranks that hold identical state (one snapshot per group suffices): DDP replicas form one group;
    the replicas of one pipeline stage form one; placement shards and ZeRO partitions are each their own."""
    world = spec.cluster.workers
    if spec.pipeline.stages > 1:
        return mesh_groups(spec.pipeline.stages, world // spec.pipeline.stages)[1]
    if spec.placement.enabled or spec.engine.deepspeed:
        return [[r] for r in range(world)]
    return [list(range(world))]


def build_engine(spec, model: GPT, warmup_batch, device: torch.device, events=None) -> Engine:
    if spec.engine.deepspeed:  # ZeRO partitions by DeepSpeed, on this rank's process group
        t = spec.train
        return DeepSpeedEngine(model, spec.engine.deepspeed_config, batch_size=t.batch_size, lr=t.lr,
                               weight_decay=t.weight_decay, grad_clip=t.grad_clip, loss_fn=lm_loss, device=device)
    if spec.placement.enabled:  # parameters, gradients and optimizer state in chunks over the tiers
        return ChunkedEngine(model, spec.placement, lr=spec.train.lr, weight_decay=spec.train.weight_decay,
                             loss_fn=lm_loss, device=device, events=events)
    if spec.pipeline.stages > 1:
        return PipelineEngine(model, spec.pipeline, spec.memory, spec.train, warmup_batch=warmup_batch,
                              replicas=spec.cluster.workers // spec.pipeline.stages,
                              timeout_s=spec.cluster.step_collective_timeout_s)
    policy = build_policy(spec.memory, model, warmup_batch) if spec.memory.activations != "none" else None
    return DataParallelEngine(model, policy, spec.train, spec.cluster.step_collective_timeout_s)
