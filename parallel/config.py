"""``[pipeline]`` in the job spec: which schedule, how many stages, microbatches and chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .costs import LayerCost
from .ir import Schedule
from .offload_pass import selective_offload, with_offload
from .schedules import SCHEDULE_NAMES, canonical, make_schedule, natural_chunks, stage_layout
from .simulate import StageCost
from .split import balance_layers

SPLITS = ("even", "auto")
OFFLOADS = ("none", "all", "selective")


@dataclass(kw_only=True)
class PipelineConfig:
    schedule: str = "1f1b"
    """Pipeline schedule: gpipe | 1f1b | interleaved | zb-h1 | zb-h2 | zb-v | v-half | v-min."""
    stages: int = 1
    """Pipeline ranks p (the worker group's size, or its pipeline dimension)."""
    microbatches: int = 1
    """Microbatches m per step; each rank's batch is split into m equal parts."""
    chunks: int = 0
    """Stages (chunks) per rank v; 0 = the schedule's own (1, or 2 for interleaved and V-shapes)."""
    layers_per_stage: list[int] = field(default_factory=list)
    """Blocks per global stage (p·v entries, uneven allowed); empty = as ``split`` says."""
    split: str = "even"
    """How blocks go to stages when layers_per_stage is empty: "even" (as even as possible) or
    "auto" (balanced from the model's measured per-layer forward/backward times and saved bytes,
    embedding and head included; the job measures them at start and records them)."""
    offload: str | bool = "none"
    """Stashes to host memory between their forward and backward (PipeOffload): "none"; "all" (every
    stash with compute between its F and its backward); "selective" (only those whose lifespan covers
    the copy there and back, from per-layer costs and the copy bandwidth measured at start).
    true/false mean "all"/"none"."""
    timeout_s: float = 60.0
    """Longest wait for one send/recv before the step fails naming rank, action and peer."""

    def __post_init__(self) -> None:
        try:
            self.schedule = canonical(self.schedule)
        except ValueError:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULE_NAMES)}") from None
        if self.stages < 1:
            raise ValueError(f"stages={self.stages} must be >= 1")
        if self.microbatches < 1:
            raise ValueError(f"microbatches={self.microbatches} must be >= 1")
        if self.chunks < 0:
            raise ValueError(f"chunks={self.chunks} must be >= 0 (0 = the schedule's own)")
        if self.chunks and self.schedule != "interleaved" and self.chunks != natural_chunks(self.schedule):
            raise ValueError(f"chunks={self.chunks} does not fit schedule {self.schedule!r}; "
                             f"use {natural_chunks(self.schedule)} or 0")
        if self.schedule == "interleaved" and self.microbatches % self.stages:
            raise ValueError(f"microbatches={self.microbatches} must be a multiple of stages={self.stages} for interleaved")
        n = self.stages * self.v
        if self.layers_per_stage and (len(self.layers_per_stage) != n or min(self.layers_per_stage) < 0):
            raise ValueError(f"layers_per_stage={self.layers_per_stage} must have stages*chunks={n} non-negative entries")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} must be one of {', '.join(SPLITS)}")
        if self.split == "auto" and self.layers_per_stage:
            raise ValueError(f"split='auto' and layers_per_stage={self.layers_per_stage} are both set; keep one")
        if isinstance(self.offload, bool):
            self.offload = "all" if self.offload else "none"
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload={self.offload!r} must be one of {', '.join(OFFLOADS)} (or true/false)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")

    @property
    def v(self) -> int:
        return self.chunks or natural_chunks(self.schedule)


def build_schedule(cfg: PipelineConfig, stage_costs: Sequence[StageCost] | None = None,
                   copy_bytes_per_s: float | None = None) -> Schedule:
    """The schedule ``cfg`` names, with OFFLOAD/RELOAD as ``cfg.offload`` says ("selective" needs
    the measured ``stage_costs`` and ``copy_bytes_per_s``)."""
    sched = make_schedule(cfg.schedule, cfg.stages, cfg.microbatches, cfg.v)
    if cfg.offload == "all":
        return with_offload(sched)
    if cfg.offload == "selective":
        if stage_costs is None or not copy_bytes_per_s:
            raise ValueError("pipeline.offload='selective' needs measured stage costs and the copy bandwidth; none were given")
        return selective_offload(sched, stage_costs, copy_bytes_per_s=copy_bytes_per_s)
    return sched


def build_measured_schedule(cfg: PipelineConfig, layers, step, *, layers_per_stage: Sequence[int],
                            exclude=(), profile_steps: int = 1) -> tuple[Schedule, dict]:
    """``build_schedule(cfg)``, with "selective" offload chosen from costs measured now: the per-layer
    times and bytes of one microbatch (``layers`` as :func:`profile_layers` takes them, ``step()`` its
    loss) and the copy engine's device->host bandwidth on a buffer the size of the largest stash.
    Returns the schedule and what was measured (for the run's events)."""
    if cfg.offload != "selective":
        return build_schedule(cfg), {}
    from trainmem.offload import CopyEngine

    from .costs import profile_layers
    from .split import stage_costs
    from .stash import measure_copy_bandwidth

    costs = profile_layers(layers, step, exclude=exclude, steps=profile_steps)
    device = next((p.device for _, mod in layers for p in mod.parameters()), "cpu")
    copier = CopyEngine(device)
    try:
        bandwidth = measure_copy_bandwidth(copier, max(c.saved_bytes for c in stage_costs(costs, layers_per_stage)))
    finally:
        copier.close()
    sched = build_schedule(cfg, stage_costs(costs, layers_per_stage, bandwidth), copy_bytes_per_s=bandwidth)
    offloaded = sum(a.kind.name == "OFFLOAD" for acts in sched.ranks for a in acts)
    return sched, {"copy_bytes_per_s": bandwidth, "offloaded_stashes": offloaded}


def layers_per_stage_for(cfg: PipelineConfig, n_layer: int, layer_costs: Sequence[LayerCost] | None = None) -> list[int] | None:
    """Blocks per global stage as ``cfg`` asks (None = even); "auto" needs ``layer_costs``
    (embedding, n_layer blocks, head, as ``profile_layers`` measures them)."""
    if cfg.layers_per_stage:
        return list(cfg.layers_per_stage)
    if cfg.split == "even":
        return None
    if layer_costs is None:
        raise ValueError("pipeline.split='auto' needs the model's measured layer costs (profile_layers); none were given")
    if len(layer_costs) != n_layer + 2:
        raise ValueError(f"pipeline.split='auto': {len(layer_costs)} layer costs for a model of {n_layer} blocks "
                         f"(expected {n_layer + 2}: embedding, blocks, head)")
    return balance_layers(layer_costs, cfg.stages * cfg.v)


def layout_for(cfg: PipelineConfig, n_layer: int,
               layer_costs: Sequence[LayerCost] | None = None) -> list[list[tuple[int, int]]]:
    """Per rank, the (global stage, blocks) it owns for a model with n_layer blocks."""
    return stage_layout(cfg.schedule, cfg.stages, n_layer, cfg.v, layers_per_stage_for(cfg, n_layer, layer_costs))
