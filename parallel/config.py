"""``[pipeline]`` in the job spec: which schedule, how many stages, microbatches and chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Schedule
from .offload_pass import with_offload
from .schedules import SCHEDULE_NAMES, canonical, make_schedule, natural_chunks, stage_layout


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
    """Blocks per global stage (p·v entries, uneven allowed); empty = as even as possible."""
    offload: bool = False
    """Offload each stash to host memory after its forward and reload it before its backward."""
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
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")

    @property
    def v(self) -> int:
        return self.chunks or natural_chunks(self.schedule)


def build_schedule(cfg: PipelineConfig) -> Schedule:
    """The schedule ``cfg`` names (with OFFLOAD/RELOAD when ``cfg.offload``)."""
    sched = make_schedule(cfg.schedule, cfg.stages, cfg.microbatches, cfg.v)
    return with_offload(sched) if cfg.offload else sched


def layout_for(cfg: PipelineConfig, n_layer: int) -> list[list[tuple[int, int]]]:
    """Per rank, the (global stage, blocks) it owns for a model with n_layer blocks."""
    return stage_layout(cfg.schedule, cfg.stages, n_layer, cfg.v, cfg.layers_per_stage or None)
