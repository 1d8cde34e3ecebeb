"""Offload inside the schedule (PipeOffload): stash to host after F, reload before the backward.

``with_offload`` inserts the actions into a schedule whose sends and receives are already placed
(it places them first when they are not), so every rank's point-to-point order is the offload-free
schedule's whatever each rank chooses to offload. ``selective_offload`` is PipeOffload's selective
scheme: a stash goes to the host only when its lifespan, the time its rank spends between the end
of its F and the start of its backward (simulated from measured stage costs), covers the round
trip of its copy at the measured bandwidth; a stash whose backward follows at once (the last
stage in 1F1B) stays, where offloading would add copy time and free nothing for long.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .comms import add_comms, has_comms
from .ir import BACKWARD, COMPUTE, Action, Kind, Schedule
from .simulate import Costs, StageCost, simulate


def _running_peak(acts: list[Action], weight: dict[int, float]) -> float:
    cur = peak = 0.0
    for a in acts:
        if a.kind in (Kind.F, Kind.RELOAD):
            cur += weight[a.stage]
            peak = max(peak, cur)
        elif a.kind in (Kind.W, Kind.BW, Kind.OFFLOAD):
            cur -= weight[a.stage]
    return peak


def _first_backward(acts: list[Action], f: int) -> int | None:
    a = acts[f]
    return next((j for j in range(f + 1, len(acts)) if acts[j].kind in BACKWARD
                 and (acts[j].stage, acts[j].mb) == (a.stage, a.mb)), None)


def _offload_rank(acts: list[Action], chosen, weight: dict[int, float], min_gap: int, prefetch: int) -> list[Action]:
    """One rank's actions with OFFLOAD after each chosen F (after the sends that follow it) and
    RELOAD right before its backward, then moved up to ``prefetch`` compute actions earlier while
    the rank's peak stays where the latest reloads put it."""
    row = list(acts)
    pairs = []
    for i, a in enumerate(acts):
        if a.kind is not Kind.F or (chosen is not None and (a.stage, a.mb) not in chosen):
            continue
        back = _first_backward(acts, i)
        if back is None or sum(x.kind in COMPUTE for x in acts[i + 1:back]) < min_gap:
            continue  # nothing runs between: an offload would free nothing
        pairs.append(a)
    for a in pairs:
        i = row.index(a)
        at = i + 1
        while at < len(row) and row[at].kind in (Kind.SEND_F, Kind.SEND_B):
            at += 1
        row.insert(at, Action(a.stage, Kind.OFFLOAD, a.mb, a.chunk))
        back = _first_backward(row, i)
        row.insert(back, Action(a.stage, Kind.RELOAD, a.mb, a.chunk))
    floor = _running_peak(row, weight)
    for a in pairs:
        pos = row.index(Action(a.stage, Kind.RELOAD, a.mb, a.chunk))
        off = row.index(Action(a.stage, Kind.OFFLOAD, a.mb, a.chunk))
        passed = 0
        while pos - 1 > off and passed < prefetch:
            prev = row[pos - 1]
            trial = row[:pos - 1] + [row[pos], prev] + row[pos + 1:]
            if _running_peak(trial, weight) > floor + 1e-9:
                break
            row, pos = trial, pos - 1
            passed += prev.kind in COMPUTE
    return row


def with_offload(schedule: Schedule, chosen: Collection[tuple[int, int]] | None = None, *, min_gap: int = 1,
                 prefetch: int = 1, mem_weights: dict[int, float] | None = None) -> Schedule:
    """Offload the stashes ``chosen`` ((stage, microbatch); None: every one with at least
    ``min_gap`` compute actions between its F and its backward). Each RELOAD sits as early as
    ``prefetch`` compute actions before its backward as the rank's peak (``mem_weights`` per stage,
    default equal shares) allows, so its copy overlaps compute without holding more memory."""
    if not has_comms(schedule):
        schedule = add_comms(schedule)
    weight = {s: 1.0 / schedule.v for s in range(schedule.n_stages)}
    weight.update(mem_weights or {})
    chosen = set(chosen) if chosen is not None else None
    ranks = [_offload_rank(acts, chosen, weight, min_gap, prefetch) for acts in schedule.ranks]
    return schedule.with_ranks(ranks, name=schedule.name + "+offload")


def lifespans(schedule: Schedule, stage_costs: Sequence[StageCost], comm_s: float = 0.0) -> dict[tuple[int, int], float]:
    """Per (stage, microbatch): seconds from the end of its F to the start of its first backward on
    the timeline ``simulate`` gives with these stage costs."""
    sim = simulate(schedule, Costs(comm=comm_s), stage_costs=stage_costs)
    f_end: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], float] = {}
    for slots in sim.timeline:
        for slot in slots:
            key = (slot.action.stage, slot.action.mb)
            if slot.action.kind is Kind.F:
                f_end[key] = slot.end
            elif slot.action.kind in BACKWARD and key not in back:
                back[key] = slot.start
    return {k: back[k] - f_end[k] for k in f_end if k in back}


def selective_offload(schedule: Schedule, stage_costs: Sequence[StageCost], *, copy_bytes_per_s: float,
                      comm_s: float = 0.0, prefetch: int = 1) -> Schedule:
    """Offload exactly the stashes whose lifespan covers their copy there and back
    (2 x ``saved_bytes`` / ``copy_bytes_per_s``)."""
    if not copy_bytes_per_s > 0:
        raise ValueError(f"copy_bytes_per_s={copy_bytes_per_s} must be > 0 (measure the copy engine's bandwidth)")
    spans = lifespans(schedule, stage_costs, comm_s)
    chosen = {key for key, span in spans.items() if span >= 2 * stage_costs[key[0]].saved_bytes / copy_bytes_per_s}
    weights = {s: float(c.saved_bytes) for s, c in enumerate(stage_costs)}
    return with_offload(schedule, chosen, prefetch=prefetch, mem_weights=weights)


def is_offloaded(schedule: Schedule) -> bool:
    return any(a.kind is Kind.OFFLOAD for acts in schedule.ranks for a in acts)


__all__ = ["is_offloaded", "lifespans", "selective_offload", "with_offload"]
