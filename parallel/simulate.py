"""Simulate a schedule: per-rank timeline, bubble fraction and peak activation memory.

Times: ``Costs`` gives the cost of F, B, W for *all* of a rank's layers; a stage holding a fraction
``1/v`` of them costs that fraction (so schedules with different v compare fairly). BW = B + W.
Sends are non-blocking; a RECV posts the receive (it cannot pass the matching SEND, which is what
makes a cycle a deadlock) and the compute that consumes it waits until the data arrives (send time
+ ``comm``). OFFLOAD/RELOAD run on a per-rank copy engine beside compute, in order; as the
executor does, an F or a RELOAD (what allocates) first waits until every earlier offload copy
has ended, so an offloaded stash never shares the device with a new allocation.

Memory (in M_B = one microbatch's activations of one rank's layers): F allocates its stage's share
when it starts; W or BW frees it when it ends; OFFLOAD frees it when its copy ends, RELOAD takes it
back when its copy starts. With the wait above the peak equals :func:`order_peak`'s.

Bubble of a rank = idle time inside its own span (first compute start → last compute end) / span;
the schedule's bubble is the worst rank's. With equal costs this gives the textbook figures,
e.g. 1F1B (p-1)/(m+p-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .comms import add_comms, has_comms
from .ir import BACKWARD, Action, DeadlockError, Kind, Schedule


def _pass_time(kind: Kind, f: float, b: float, w: float) -> float:
    return {Kind.F: f, Kind.B: b, Kind.W: w, Kind.BW: b + w}[kind]


@dataclass(kw_only=True)
class Costs:
    f: float = 1.0
    """Forward time of all of one rank's layers for one microbatch."""
    b: float = 1.0
    """Input-gradient backward time (B)."""
    w: float = 1.0
    """Weight-gradient backward time (W); a fused BW costs b + w."""
    comm: float = 0.0
    """Time from a SEND to the matching RECV's data being there."""
    offload: float = 1.0
    """Time to copy one M_B to host (and the same to reload)."""

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "comm", "offload"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    @staticmethod
    def parse(text: str) -> "Costs":
        """'F,B,W' or 'F,B,W,COMM' or 'F,B,W,COMM,OFFLOAD'."""
        try:
            vals = [float(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"costs={text!r} must be numbers 'F,B,W[,COMM[,OFFLOAD]]'") from None
        if not 3 <= len(vals) <= 5:
            raise ValueError(f"costs={text!r} must be 'F,B,W[,COMM[,OFFLOAD]]'")
        names = ("f", "b", "w", "comm", "offload")
        return Costs(**dict(zip(names, vals)))

    def of(self, kind: Kind) -> float:
        return _pass_time(kind, self.f, self.b, self.w)


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """Measured times of one stage for one microbatch (seconds), replacing Costs' shares."""

    f: float
    b: float
    w: float
    saved_bytes: int = 0
    copy: float = 0.0
    """Time to copy the stage's stash to host (and the same to reload)."""

    def of(self, kind: Kind) -> float:
        return _pass_time(kind, self.f, self.b, self.w)


@dataclass
class Slot:
    start: float
    end: float
    action: Action
    engine: str = "compute"  # or "copy"


@dataclass
class SimResult:
    makespan: float
    bubble: float
    bubble_per_rank: list[float]
    peak_mb: list[float]
    timeline: list[list[Slot]] = field(repr=False)

    def as_dict(self) -> dict:
        return {
            "makespan": round(self.makespan, 6),
            "bubble": round(self.bubble, 6),
            "bubble_per_rank": [round(b, 6) for b in self.bubble_per_rank],
            "peak_mb": [round(x, 6) for x in self.peak_mb],
        }


def _blocked_message(schedule: Schedule, rank: int, idx: int, a: Action) -> str:
    peer_stage = a.stage - 1 if a.kind is Kind.RECV_F else a.stage + 1
    want = Kind.SEND_F if a.kind is Kind.RECV_F else Kind.SEND_B
    return (
        f"rank {rank} action #{idx} {a} waits for {peer_stage}{want.value}{a.mb} "
        f"from rank {schedule.rank_of(peer_stage)}, which never gets to send it"
    )


def simulate(schedule: Schedule, costs: Costs | None = None, mem_weights: dict[int, float] | None = None,
             stage_costs: Sequence[StageCost] | None = None) -> SimResult:
    """Run ``schedule`` in simulated time. ``mem_weights[stage]`` overrides a stage's memory share;
    ``stage_costs[stage]`` gives measured per-stage times (then ``costs`` supplies only ``comm``).

    Raises DeadlockError naming each stuck rank, its action and what it waits for.
    """
    costs = costs or Costs()
    if not has_comms(schedule):
        schedule = add_comms(schedule)
    v = schedule.v
    share = {s: 1.0 / v for s in range(schedule.n_stages)}
    mem_share = dict(share)
    if mem_weights:
        mem_share.update(mem_weights)
    if stage_costs is not None and len(stage_costs) != schedule.n_stages:
        raise ValueError(f"stage_costs has {len(stage_costs)} entries for a schedule of {schedule.n_stages} stages")

    def duration(a: Action) -> float:
        if stage_costs is not None:
            return stage_costs[a.stage].of(a.kind)
        return costs.of(a.kind) * share[a.stage]

    def copy_time(a: Action) -> float:
        return stage_costs[a.stage].copy if stage_costs is not None else costs.offload * share[a.stage]

    p = schedule.p
    ptr = [0] * p
    t_compute = [0.0] * p
    t_copy = [0.0] * p
    sent: dict[tuple[Kind, int, int], float] = {}
    arrives: dict[tuple[Kind, int, int], float] = {}  # posted RECV -> when its data is there
    reload_done: dict[tuple[int, int], float] = {}
    offload_end = [0.0] * p  # when the rank's offload copies issued so far have all ended
    timeline: list[list[Slot]] = [[] for _ in range(p)]
    events: list[list[tuple[float, int, float]]] = [[] for _ in range(p)]  # (time, order, delta)

    while any(ptr[r] < len(schedule.ranks[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            acts = schedule.ranks[r]
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                if a.kind in (Kind.RECV_F, Kind.RECV_B):
                    key = (Kind.SEND_F if a.kind is Kind.RECV_F else Kind.SEND_B,
                           a.stage - 1 if a.kind is Kind.RECV_F else a.stage + 1, a.mb)
                    if key not in sent:
                        break
                    arrives[(a.kind, a.stage, a.mb)] = sent[key] + costs.comm
                elif a.kind in (Kind.SEND_F, Kind.SEND_B):
                    sent[(a.kind, a.stage, a.mb)] = t_compute[r]
                elif a.kind in (Kind.OFFLOAD, Kind.RELOAD):
                    if a.kind is Kind.RELOAD:
                        t_compute[r] = max(t_compute[r], offload_end[r])
                    start = max(t_copy[r], t_compute[r])
                    end = start + copy_time(a)
                    t_copy[r] = end
                    timeline[r].append(Slot(start, end, a, "copy"))
                    if a.kind is Kind.OFFLOAD:
                        offload_end[r] = end
                        events[r].append((end, 0, -mem_share[a.stage]))
                    else:
                        events[r].append((start, 1, mem_share[a.stage]))
                        reload_done[(a.stage, a.mb)] = end
                else:
                    start = max(t_compute[r], reload_done.pop((a.stage, a.mb), 0.0), _input_arrival(arrives, a),
                                offload_end[r] if a.kind is Kind.F else 0.0)
                    end = start + duration(a)
                    t_compute[r] = end
                    timeline[r].append(Slot(start, end, a))
                    if a.kind is Kind.F:
                        events[r].append((start, 1, mem_share[a.stage]))
                    elif a.kind in (Kind.W, Kind.BW):
                        events[r].append((end, 0, -mem_share[a.stage]))
                ptr[r] += 1
                progressed = True
        if not progressed:
            stuck = [
                _blocked_message(schedule, r, ptr[r], schedule.ranks[r][ptr[r]])
                for r in range(p)
                if ptr[r] < len(schedule.ranks[r])
            ]
            raise DeadlockError("deadlock: " + "; ".join(stuck))
    return _summarize(timeline, events)


def _input_arrival(arrives: dict, a: Action) -> float:
    if a.kind is Kind.F:
        return arrives.pop((Kind.RECV_F, a.stage, a.mb), 0.0)
    if a.kind in BACKWARD:
        return arrives.pop((Kind.RECV_B, a.stage, a.mb), 0.0)
    return 0.0


def _summarize(timeline: list[list[Slot]], events: list[list[tuple[float, int, float]]]) -> SimResult:
    bubbles, peaks = [], []
    first, last = float("inf"), 0.0
    for r, slots in enumerate(timeline):
        comp = [s for s in slots if s.engine == "compute"]
        if not comp:
            bubbles.append(0.0)
        else:
            lo, hi = min(s.start for s in comp), max(s.end for s in comp)
            first, last = min(first, lo), max(last, hi)
            busy = sum(s.end - s.start for s in comp)
            bubbles.append((hi - lo - busy) / (hi - lo) if hi > lo else 0.0)
        cur = peak = 0.0
        for _, _, delta in sorted(events[r]):  # frees before allocations at equal times
            cur += delta
            peak = max(peak, cur)
        peaks.append(peak)
    makespan = last - first if last > first else 0.0
    return SimResult(makespan, max(bubbles), bubbles, peaks, timeline)


def order_peak(schedule: Schedule, mem_weights: dict[int, float] | None = None) -> list[float]:
    """Peak memory per rank from action order alone (what the executor measures, no offload timing)."""
    share = {s: 1.0 / schedule.v for s in range(schedule.n_stages)}
    share.update(mem_weights or {})
    peaks = []
    for acts in schedule.ranks:
        cur = peak = 0.0
        for a in acts:
            if a.kind in (Kind.F, Kind.RELOAD):
                cur += share[a.stage]
                peak = max(peak, cur)
            elif a.kind in (Kind.W, Kind.BW, Kind.OFFLOAD):
                cur -= share[a.stage]
        peaks.append(peak)
    return peaks


__all__ = ["Costs", "SimResult", "Slot", "StageCost", "DeadlockError", "simulate", "order_peak"]
