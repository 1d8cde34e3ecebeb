"""Measured per-layer costs: time them on a real model, record them in a run, read them back.

A model is profiled as its pipeline sees it: ``layers`` in order, the embedding first and the head
(with the loss) last, so a split can place every part. ``profile_layers`` times each layer's
forward and backward with module hooks over a few real steps and counts the bytes autograd saves
in each layer's forward. A run records the result as one ``layer_costs`` event in events.jsonl
(see ``layer_costs_record``); ``read_run_costs`` gives it back with the run's measured step times
from metrics.jsonl, for ``trainmem schedule pick --from-run``.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

RECORD_FORMAT = 1


@dataclass(kw_only=True)
class LayerCost:
    name: str
    """What the layer is ("embed", "block3", "head")."""
    forward_s: float
    """Forward time of one microbatch (the head's includes the loss)."""
    backward_s: float
    """Fused backward time of one microbatch (input and weight gradients)."""
    saved_bytes: int
    """Bytes autograd saves in this layer's forward for one microbatch (parameters and the step's
    own inputs and targets excluded)."""
    input_grad_s: float | None = None
    """Part of backward_s that computes the input gradient (B), if measured; else half of it."""

    def __post_init__(self) -> None:
        for key in ("forward_s", "backward_s", "saved_bytes"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0 (layer {self.name!r})")
        if self.input_grad_s is not None and not 0 <= self.input_grad_s <= self.backward_s:
            raise ValueError(f"input_grad_s={self.input_grad_s} must lie in 0..backward_s={self.backward_s} (layer {self.name!r})")

    @property
    def b_s(self) -> float:
        return self.backward_s / 2 if self.input_grad_s is None else self.input_grad_s

    @property
    def w_s(self) -> float:
        return self.backward_s - self.b_s


class _Clock:
    """Timestamps from module hooks; on CUDA each one synchronizes so it marks finished work."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def profile_layers(layers: Sequence[tuple[str, nn.Module]], step: Callable[[], torch.Tensor], *,
                   exclude: Sequence[torch.Tensor] = (), steps: int = 3, warmup: int = 1) -> list[LayerCost]:
    """Per-layer costs of one microbatch, median over ``steps`` timed runs after ``warmup``.

    ``layers`` are (name, module) in the order the forward runs them (embedding, blocks, head);
    ``step()`` runs the forward of one microbatch through all of them and returns the loss
    (this function runs its backward). ``exclude``: tensors saved but not activations (the
    microbatch's inputs and targets). Parameter gradients are left as the backward made them.
    """
    if not layers:
        raise ValueError("layers is empty: pass (name, module) pairs in forward order")
    params = {p.untyped_storage().data_ptr() for _, mod in layers for p in mod.parameters()}
    skip = params | {t.untyped_storage().data_ptr() for t in exclude}
    device = next((p.device for _, mod in layers for p in mod.parameters()), torch.device("cpu"))
    clock = _Clock(device)
    n = len(layers)
    fwd_start, fwd_end, bwd_start = [0.0] * n, [0.0] * n, [0.0] * n
    saved = [0] * n
    current = [0]
    seen: set[int] = set()
    handles = []
    for i, (_, mod) in enumerate(layers):
        def pre(_m, _args, i=i):
            current[0] = i
            fwd_start[i] = clock.now()

        def post(_m, _args, _out, i=i):
            fwd_end[i] = clock.now()

        def bpre(_m, _grad, i=i):
            bwd_start[i] = clock.now()

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post),
                    mod.register_full_backward_pre_hook(bpre)]

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            saved[current[0]] += t.untyped_storage().nbytes()
        return t

    runs: list[list[tuple[float, float, int]]] = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for k in range(warmup + steps):
                seen.clear()
                saved[:] = [0] * n
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = step()
                t_loss = clock.now()
                loss.backward()
                t_done = clock.now()
                if k < warmup:
                    continue
                row = []
                for i in range(n):
                    f = (t_loss if i == n - 1 else fwd_end[i]) - fwd_start[i]
                    b = (bwd_start[i - 1] if i > 0 else t_done) - (bwd_start[i] if i < n - 1 else t_loss)
                    row.append((f, b, saved[i]))
                runs.append(row)
    finally:
        for h in handles:
            h.remove()
    return [LayerCost(name=name, forward_s=statistics.median(r[i][0] for r in runs),
                      backward_s=max(0.0, statistics.median(r[i][1] for r in runs)),
                      saved_bytes=max(r[i][2] for r in runs))
            for i, (name, _) in enumerate(layers)]


# ---- the run record ----------------------------------------------------------------------------

def layer_costs_record(layers: Sequence[LayerCost], *, schedule: str, stages: int, microbatches: int,
                       layers_per_stage: Sequence[int] | None, microbatch_size: int, seq_len: int, device: str,
                       comm_s: float = 0.0, copy_bytes_per_s: float | None = None) -> dict:
    """The fields of the ``layer_costs`` event a run writes to events.jsonl (``format`` 1);
    ``layers_per_stage`` is the split the job runs with."""
    return {
        "format": RECORD_FORMAT,
        "pipeline": {"schedule": schedule, "stages": stages, "microbatches": microbatches,
                     "layers_per_stage": list(layers_per_stage) if layers_per_stage else None},
        "microbatch_size": microbatch_size, "seq_len": seq_len, "device": device,
        "comm_s": comm_s, "copy_bytes_per_s": copy_bytes_per_s,
        "layers": [asdict(c) for c in layers],
    }


@dataclass
class RunCosts:
    layers: list[LayerCost]
    pipeline: dict
    """The run's own [pipeline]: schedule, stages, microbatches."""
    comm_s: float = 0.0
    copy_bytes_per_s: float | None = None
    measured_step_s: list[float] = field(default_factory=list)
    """step_time_s of the run's steps (metrics.jsonl), the first step left out (warm-up)."""
    predicted_step_s: float | None = None
    """predicted_step_s the run recorded beside them, if any."""


def _jsonl(path: Path) -> list[dict]:
    out = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{no}: not JSON ({exc.msg}); the file is damaged") from None
    return out


def read_run_costs(run_dir: str | Path) -> RunCosts:
    """The newest ``layer_costs`` record of a run and its measured step times; ValueError names
    the file and what is missing."""
    run_dir = Path(run_dir)
    events = run_dir / "events.jsonl"
    if not events.is_file():
        raise ValueError(f"--from-run {run_dir}: no events.jsonl there (is it a trainmem run directory?)")
    records = [e for e in _jsonl(events) if e.get("event") == "layer_costs"]
    if not records:
        raise ValueError(f"{events}: no layer_costs record; run the job with pipeline.split = \"auto\" so it "
                         "measures and records its per-layer costs")
    rec = records[-1]
    if rec.get("format") != RECORD_FORMAT:
        raise ValueError(f"{events}: layer_costs format={rec.get('format')!r}, this version reads {RECORD_FORMAT}")
    try:
        layers = [LayerCost(**row) for row in rec["layers"]]
        pipeline = dict(rec["pipeline"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{events}: layer_costs record is malformed ({exc})") from None
    if len(layers) < 3:
        raise ValueError(f"{events}: layer_costs has {len(layers)} layers; expected embedding, blocks, head")
    costs = RunCosts(layers, pipeline, float(rec.get("comm_s") or 0.0), rec.get("copy_bytes_per_s"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [m for m in _jsonl(metrics) if "step_time_s" in m]
        costs.measured_step_s = [float(m["step_time_s"]) for m in rows[1:]]
        predicted = [m["predicted_step_s"] for m in rows if m.get("predicted_step_s") is not None]
        costs.predicted_step_s = float(predicted[-1]) if predicted else None
    return costs
