"""The job spec: one TOML file → a typed, validated ``JobSpec``.

Sections: [model] [data] [train] [cluster] [checkpoint]. Each nests the owning package's Config.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainmem.checkpoint import CheckpointConfig
from trainmem.memory_services import ServicesConfig
from trainmem.offload import ActivationConfig, PlacementConfig, PlacementInfeasible, plan_for_module
from trainmem.parallel import PipelineConfig, check_deepspeed_config

from .models import ModelConfig
from .spec_loader import ConfigError, build_dataclass, explain, read_toml


@dataclass(kw_only=True)
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (this interpreter's standard library source, byte tokens) or 'files'."""
    paths: list[str] = field(default_factory=list)
    """With source='files': text files (.txt/.py/...) or Parquet/Arrow files with a 'text' or 'tokens' column."""
    cache_dir: str = "~/.cache/trainmem"
    """Where the tokenized corpus is cached as a memory-mapped Arrow IPC file."""

    def __post_init__(self) -> None:
        if self.source not in ("stdlib", "files"):
            raise ValueError(f"source={self.source!r} must be 'stdlib' or 'files'")
        if self.source == "files" and not self.paths:
            raise ValueError("paths=[] is empty but source='files' needs at least one file")
        if self.source == "stdlib" and self.paths:
            raise ValueError("paths=... is only read with source='files'")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 50
    """Optimizer steps to run."""
    batch_size: int = 8
    """Sequences per rank per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seeds model init, data order and dropout; the same seed gives the same run, bitwise."""
    run_dir: str = ""
    """Where metrics.jsonl, events.jsonl and checkpoints go; empty: runs/<job name>-<UTC time>."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be > 0")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} must be > 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


@dataclass(kw_only=True)
class ClusterConfig:
    address: str = ""
    """Ray cluster to join ('auto', 'ray://host:port', 'host:port'); empty starts an embedded local cluster."""
    workers: int = 2
    """Training ranks (one Ray actor each)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per rank in the placement group."""
    gpus_per_worker: float = 0.0
    """GPUs per rank; > 0 selects nccl and CUDA."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with GPUs, else gloo) | gloo | nccl."""
    hang_timeout_s: float = 60.0
    """A rank that reports no progress for this long is declared hung and the group restarts."""
    health_poll_s: float = 0.5
    """How often the controller polls worker health."""
    collective_timeout_s: float = 60.0
    """Timeout for process-group formation and every collective (a training step's collectives wait at
    most step_collective_timeout_s, which never exceeds it)."""
    max_restarts: int = 3
    """Worker-group restarts allowed before the job stops with the cause."""
    start_timeout_s: float = 120.0
    """How long to wait for the worker group to start before failing."""
    placement: str = "PACK"
    """Placement-group strategy for ranks: PACK | SPREAD | STRICT_SPREAD | STRICT_PACK."""
    recovery: str = "replace"
    """On a dead or hung rank: 'replace' it alone (healthy ranks keep their processes; engines that cannot, restart) or 'restart' the group."""
    spares: int = 0
    """Pre-started worker actors (torch imported, model built) that replace a lost rank without a cold start."""
    preempt_grace_s: float = 60.0
    """On SIGTERM to the driver: how long ranks get to reach a common step and save it durably before exit."""

    def __post_init__(self) -> None:
        if self.workers <= 0:
            raise ValueError(f"workers={self.workers} must be > 0")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker} must be >= 0")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend={self.backend!r} must be auto, gloo or nccl")
        for name in ("hang_timeout_s", "health_poll_s", "collective_timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.placement not in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"):
            raise ValueError(f"placement={self.placement!r} must be PACK, SPREAD, STRICT_SPREAD or STRICT_PACK")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts={self.max_restarts} must be >= 0")
        if self.recovery not in ("replace", "restart"):
            raise ValueError(f"recovery={self.recovery!r} must be 'replace' or 'restart'")
        if self.spares < 0:
            raise ValueError(f"spares={self.spares} must be >= 0")
        if not self.preempt_grace_s > 0:
            raise ValueError(f"preempt_grace_s={self.preempt_grace_s} must be > 0")

    @property
    def step_collective_timeout_s(self) -> float:
        """How long one collective of a training step waits for its peers.

        Longer than the controller takes to declare a silent peer hung (so it never fires first), no
        longer than collective_timeout_s. When a rank is lost, a kept rank that was not its neighbour
        in the ring hears of it only through this timeout, so it bounds the wait before replacement.
        """
        return min(self.collective_timeout_s, 1.5 * self.hang_timeout_s + 2 * self.health_poll_s + 2.0)


@dataclass(kw_only=True)
class EngineConfig:
    kind: str = "auto"
    """auto: data parallel, or the [pipeline] / [placement] engine when those sections turn on | deepspeed:
    DeepSpeed ZeRO (stage 1/2/3, its CPU offload) inside trainmem's ranks, configured by deepspeed_config."""
    deepspeed_config: str | dict[str, Any] = ""
    """With kind='deepspeed': a DeepSpeed JSON file (relative to the job file) or an inline table. It sets ZeRO
    (zero_optimization: stage, offload, buckets); batch, optimizer and clipping come from [train]."""

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "deepspeed"):
            raise ValueError(f"kind={self.kind!r} must be 'auto' or 'deepspeed'")
        if self.kind == "deepspeed" and not self.deepspeed_config:
            raise ValueError("deepspeed_config='' is empty but kind='deepspeed' needs one (a JSON file or a table "
                             "with zero_optimization.stage)")
        if self.kind != "deepspeed" and self.deepspeed_config:
            raise ValueError("deepspeed_config=... is only read with kind='deepspeed'")
        if isinstance(self.deepspeed_config, dict):
            check_deepspeed_config(self.deepspeed_config)

    @property
    def deepspeed(self) -> bool:
        return self.kind == "deepspeed"


@dataclass(kw_only=True)
class JobSpec:
    model: ModelConfig = field(default_factory=ModelConfig)
    """[model] the GPT to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """[data] the corpus."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """[train] the optimization loop."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """[cluster] Ray and the worker group."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """[checkpoint] checkpoint tiers."""
    memory: ActivationConfig = field(default_factory=ActivationConfig)
    """[memory] activation keep/offload/recompute policy under a budget."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """[pipeline] pipeline-parallel schedule (stages > 1 turns it on)."""
    services: ServicesConfig = field(default_factory=ServicesConfig)
    """[services] memory layers, retriever and consolidation served on the cluster (trainmem serve)."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """[placement] parameters, gradients and optimizer state in chunks over device, host and disk."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """[engine] which engine steps the model: trainmem's own (auto) or DeepSpeed ZeRO."""

    def __post_init__(self) -> None:
        if self.engine.deepspeed:
            self._check_deepspeed()
        if self.pipeline.stages > 1 and self.cluster.workers % self.pipeline.stages:
            raise ValueError(
                f"pipeline.stages={self.pipeline.stages} must divide cluster.workers={self.cluster.workers} "
                f"(workers = stages x data-parallel replicas; e.g. workers = {self.pipeline.stages} or "
                f"{2 * self.pipeline.stages})"
            )
        if self.pipeline.stages > 1 and self.memory.activations != "none" and self.pipeline.offload != "none":
            raise ValueError(
                f"memory.activations={self.memory.activations!r} cannot combine with pipeline.offload="
                f"{self.pipeline.offload!r}: both would move the same blocks' activations (fix: pick one, e.g. "
                "memory.activations='auto' with a budget, or pipeline.offload='selective' with activations='none')"
            )
        if self.pipeline.stages > 1 and self.train.batch_size % self.pipeline.microbatches:
            raise ValueError(
                f"pipeline.microbatches={self.pipeline.microbatches} must divide train.batch_size={self.train.batch_size}"
            )
        if self.placement.enabled:
            self._check_placement()

    def _check_deepspeed(self) -> None:
        """DeepSpeed owns the whole step: no other engine or activation policy can wrap it."""
        others = [("pipeline.stages", self.pipeline.stages > 1), ("placement.device_bytes", self.placement.enabled),
                  ("memory.activations", self.memory.activations != "none"),
                  ("model.memory_layers", bool(self.model.memory_layers))]
        for key, on in others:
            if on:
                raise ValueError(f"engine.kind='deepspeed' cannot combine with {key} (DeepSpeed's engine steps the "
                                 f"whole model with its own optimizer; remove one of them)")

    def _check_placement(self) -> None:
        """[placement] against the rest of the spec and the model's shapes (built on the meta device)."""
        if self.pipeline.stages > 1:
            raise ValueError(f"placement.device_bytes=... cannot combine with pipeline.stages={self.pipeline.stages} "
                             "(chunked placement is data-parallel; remove one of them)")
        if self.memory.activations != "none":
            raise ValueError(f"placement.device_bytes=... cannot combine with memory.activations="
                             f"{self.memory.activations!r} yet (set memory.activations='none')")
        if self.model.memory_layers:
            raise ValueError("placement.device_bytes=... cannot place model.memory_layers (sparse value rows with "
                             "their own optimizer); remove one of them")
        if self.train.batch_size % self.placement.micro_batches:
            raise ValueError(f"placement.micro_batches={self.placement.micro_batches} must divide "
                             f"train.batch_size={self.train.batch_size}")
        try:
            placement_plan(self)
        except PlacementInfeasible as e:
            raise ValueError(str(e)) from None

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir)

    @property
    def checkpoint_uri(self) -> str:
        """Where checkpoints go: s3://bucket/prefix, or a local folder's absolute path."""
        return self.checkpoint.dir or str(self.run_dir / "checkpoints")

    @property
    def checkpoint_dir(self) -> Path | None:
        """The local checkpoint folder; None when checkpoints go to S3."""
        return None if "://" in self.checkpoint_uri else Path(self.checkpoint_uri)


def placement_plan(spec: JobSpec):
    """The [placement] plan for this spec's model at cluster.workers ranks (no weights are allocated)."""
    import torch

    from .models import GPT

    with torch.device("meta"):
        model = GPT(spec.model)
    return plan_for_module(model, spec.placement, world=spec.cluster.workers)


def load_spec(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> JobSpec:
    """Parse and validate a job file; ``overrides`` ({section: {key: value}}) stand in for CLI flags."""
    source = str(path) if path is not None else "<defaults>"
    table = read_toml(path) if path is not None else {}
    for section, values in (overrides or {}).items():
        if not isinstance(table.setdefault(section, {}), dict):
            raise ConfigError(source, section, "must be a table", f"write [{section}]")
        table[section].update(values)
    spec = build_dataclass(JobSpec, table, source, "")
    check_environment(spec, source, base=Path(path).parent if path is not None else Path("."))
    resolve_paths(spec, job_name=Path(path).stem if path is not None else "job")
    return spec


def resolve_paths(spec: JobSpec, job_name: str) -> None:
    """Absolute paths: Ray workers do not share the driver's working directory."""
    if not spec.train.run_dir:
        spec.train.run_dir = f"runs/{job_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    spec.train.run_dir = str(Path(spec.train.run_dir).expanduser().resolve())
    if spec.checkpoint.dir and "://" not in spec.checkpoint.dir:
        spec.checkpoint.dir = str(Path(spec.checkpoint.dir).expanduser().resolve())
    spec.data.cache_dir = str(Path(spec.data.cache_dir).expanduser().resolve())


def check_environment(spec: JobSpec, source: str, base: Path) -> None:
    """Checks that need the machine: CPUs for an embedded cluster, readable data files."""
    if not spec.cluster.address:
        cpus = os.cpu_count() or 1
        need = spec.cluster.workers * spec.cluster.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                source,
                "cluster.workers",
                f"{spec.cluster.workers} workers x {spec.cluster.cpus_per_worker} CPUs need {need:g} CPUs, "
                f"this machine has {cpus}",
                f"use at most {int(cpus // spec.cluster.cpus_per_worker)} workers or set cluster.address",
            )
    resolved = []
    for i, p in enumerate(spec.data.paths):
        candidate = Path(p).expanduser()
        if not candidate.is_absolute() and not candidate.exists():
            candidate = base / candidate
        if not candidate.is_file() or not os.access(candidate, os.R_OK):
            raise ConfigError(source, f"data.paths[{i}]", f"{p!r} is not a readable file", "fix the path")
        resolved.append(str(candidate.resolve()))
    spec.data.paths = resolved
    if spec.engine.deepspeed and isinstance(spec.engine.deepspeed_config, str):
        spec.engine.deepspeed_config = read_deepspeed_json(spec.engine.deepspeed_config, source, base)


def read_deepspeed_json(path: str, source: str, base: Path) -> dict[str, Any]:
    """The DeepSpeed JSON file, read once and checked (spec.json keeps its content, so --resume needs no file)."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        table = json.loads(candidate.read_text())
    except OSError as e:
        raise ConfigError(source, "engine.deepspeed_config", f"cannot read {str(candidate)!r} ({e.strerror})",
                          "give the path of a DeepSpeed JSON file, relative to the job file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(source, "engine.deepspeed_config", f"{candidate} is not JSON ({e})",
                          "fix the JSON syntax") from None
    try:
        check_deepspeed_config(table)
    except ValueError as e:
        text = str(e).removeprefix("deepspeed_config.")
        raise ConfigError(str(candidate), text.split("=", 1)[0], text) from None
    return table


def explain_rows() -> list[tuple[str, str, str, str]]:
    return explain(JobSpec)
