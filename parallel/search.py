"""Pick the fastest simulated schedule whose peak activation memory fits a budget.

With unit costs (``Costs``) memory is in M_B; with measured per-layer costs each candidate is
split by ``balance_layers`` for its own number of stages, simulated in seconds, and its memory
is in bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .costs import LayerCost
from .ir import Schedule
from .offload_pass import selective_offload, with_offload
from .schedules import SCHEDULE_NAMES, make_schedule
from .simulate import Costs, SimResult, simulate
from .split import balance_layers, predict, stage_costs


@dataclass
class Candidate:
    name: str
    offload: bool
    schedule: Schedule
    sim: SimResult
    layers_per_stage: list[int] | None = None
    """The measured-cost split this candidate was simulated with (None: unit costs)."""

    @property
    def peak(self) -> float:
        """Largest per-rank peak: M_B with unit costs, bytes with measured ones."""
        return max(self.sim.peak_mb)

    def as_dict(self) -> dict:
        out = {"schedule": self.name, "offload": self.offload, **self.sim.as_dict()}
        if self.layers_per_stage is not None:
            out["layers_per_stage"] = self.layers_per_stage
            out["predicted_step_s"] = out["makespan"]
            out["peak_bytes"] = out.pop("peak_mb")
        return out


def candidates(p: int, m: int, costs: Costs, offload: bool = True, layers: Sequence[LayerCost] | None = None,
               copy_bytes_per_s: float | None = None) -> list[Candidate]:
    """Every generator that builds for (p, m), plus its offloaded form; unbuildable ones skipped.
    With unit costs the offloaded form offloads every stash it can; with measured ``layers`` it is
    PipeOffload's selective form for that split and ``copy_bytes_per_s`` (left out without it)."""
    out = []
    for name in SCHEDULE_NAMES:
        try:
            sched = make_schedule(name, p, m)
        except ValueError:
            continue  # e.g. interleaved needs m % p == 0
        if layers is None:
            out.append(Candidate(name, False, sched, simulate(sched, costs)))
            if offload:
                form = with_offload(sched)
                out.append(Candidate(name, True, form, simulate(form, costs)))
            continue
        split = balance_layers(layers, sched.n_stages)
        forms = [(False, sched)]
        if offload and copy_bytes_per_s:
            per_stage = stage_costs(layers, split, copy_bytes_per_s)
            forms.append((True, selective_offload(sched, per_stage, copy_bytes_per_s=copy_bytes_per_s, comm_s=costs.comm)))
        for off, form in forms:
            sim = predict(form, layers, split, comm_s=costs.comm, copy_bytes_per_s=copy_bytes_per_s)
            out.append(Candidate(name, off, form, sim, split))
    return out


def pick(p: int, m: int, budget: float, costs: Costs, offload: bool = True, layers: Sequence[LayerCost] | None = None,
         copy_bytes_per_s: float | None = None) -> tuple[Candidate | None, list[Candidate]]:
    """The fastest candidate with max peak <= budget (M_B, or bytes with measured ``layers``);
    ties go to no offload, then less memory."""
    cands = candidates(p, m, costs, offload, layers, copy_bytes_per_s)
    fits = [c for c in cands if c.peak <= budget * (1 + 1e-9)]
    best = min(fits, key=lambda c: (round(c.sim.makespan, 9), c.offload, c.peak), default=None)
    return best, cands
