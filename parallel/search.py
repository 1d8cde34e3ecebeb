"""Pick the fastest simulated schedule whose peak activation memory fits a budget."""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Schedule
from .offload_pass import with_offload
from .schedules import SCHEDULE_NAMES, make_schedule
from .simulate import Costs, SimResult, simulate


@dataclass
class Candidate:
    name: str
    offload: bool
    schedule: Schedule
    sim: SimResult

    def as_dict(self) -> dict:
        return {"schedule": self.name, "offload": self.offload, **self.sim.as_dict()}


def candidates(p: int, m: int, costs: Costs, offload: bool = True) -> list[Candidate]:
    """Every generator that builds for (p, m), plus its offloaded form; unbuildable ones skipped."""
    out = []
    for name in SCHEDULE_NAMES:
        try:
            sched = make_schedule(name, p, m)
        except ValueError:
            continue  # e.g. interleaved needs m % p == 0
        out.append(Candidate(name, False, sched, simulate(sched, costs)))
        if offload:
            off = with_offload(sched)
            out.append(Candidate(name, True, off, simulate(off, costs)))
    return out


def pick(p: int, m: int, budget: float, costs: Costs, offload: bool = True) -> tuple[Candidate | None, list[Candidate]]:
    """The fastest candidate with max peak <= budget (M_B); ties go to no offload, then less memory."""
    cands = candidates(p, m, costs, offload)
    fits = [c for c in cands if max(c.sim.peak_mb) <= budget + 1e-9]
    best = min(fits, key=lambda c: (round(c.sim.makespan, 9), c.offload, max(c.sim.peak_mb)), default=None)
    return best, cands
