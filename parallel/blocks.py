"""Building blocks ("Pipeline Parallelism with Controllable Memory"): a schedule is one microbatch's
pattern of F and B passes, repeated every ``interval`` slots. The pattern's *lifespan* per stage
(first F → its W) fixes the peak memory: a rank holds ceil(lifespan / interval) stashes of a stage.

V-Min and V-Half are V-shape blocks (rank r holds stages r and 2p-1-r) whose forward legs advance
1 resp. 2 slots per rank, giving about 1/3 resp. 1/2 of 1F1B's activation memory. W passes fill the
free slots after their B; a squeeze pass then pulls passes into earlier free slots while keeping the
block's peak memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .generators import _sched
from .ir import Kind, Schedule, v_placement


@dataclass
class BuildingBlock:
    name: str
    p: int
    interval: int
    """Slots between two microbatches' copies of the block (per-rank work per microbatch)."""
    offsets: list[dict[tuple[Kind, int], int]]
    """offsets[rank][(kind, stage)] = slot of that pass for microbatch 0 (F and B only)."""
    placement: list[list[int]]

    def lifespans(self, m: int) -> list[dict[int, int]]:
        """Per rank and stage: the longest F-start → W-end span over m repeated microbatches."""
        times = _place(self, m)
        return [{s: max(times[r][(Kind.W, s, mb)] + 1 - times[r][(Kind.F, s, mb)] for mb in range(m))
                 for s in self.placement[r]} for r in range(self.p)]

    def predicted_peak_mb(self, m: int) -> list[float]:
        """Peak memory bound from lifespans: at most ceil(lifespan / interval) live stashes per stage."""
        v = len(self.placement[0])
        return [sum(math.ceil(span / self.interval) for span in spans.values()) / v for spans in self.lifespans(m)]

    def repeat(self, m: int, squeeze: bool = True) -> Schedule:
        """Repeat the block for m microbatches, place W's, optionally squeeze; returns the schedule."""
        times = _place(self, m)
        if squeeze:
            times = _squeeze(self, m, times, with_w=True)
            times = _squeeze(self, m, times, with_w=False)
        rows = []
        for r in range(self.p):
            slots = sorted((t, kind, s, mb) for (kind, s, mb), t in times[r].items())
            rows.append([(kind, s, mb) for _, kind, s, mb in slots])
        return _sched(self.name, self.p, m, self.placement, rows)


def _place(block: BuildingBlock, m: int) -> list[dict[tuple[Kind, int, int], int]]:
    """Repeat F/B passes every interval slots, then put each W in the first free slot after its B."""
    out = []
    for r in range(block.p):
        times: dict[tuple[Kind, int, int], int] = {}
        used: set[int] = set()
        for (kind, s), off in block.offsets[r].items():
            for mb in range(m):
                t = off + mb * block.interval
                if t in used:
                    raise ValueError(f"{block.name}: rank {r} has two passes in slot {t}; the block's offsets collide")
                used.add(t)
                times[(kind, s, mb)] = t
        _fill_w(times, used)
        out.append(times)
    return out


def _fill_w(times: dict[tuple[Kind, int, int], int], used: set[int]) -> None:
    pending = sorted((t, s, mb) for (kind, s, mb), t in times.items() if kind is Kind.B)
    slot = 0
    for t_b, s, mb in pending:
        slot = max(slot, t_b + 1)
        while slot in used:
            slot += 1
        times[(Kind.W, s, mb)] = slot
        used.add(slot)


def _deps(kind: Kind, s: int, mb: int, n_stages: int) -> list[tuple[Kind, int, int]]:
    if kind is Kind.F:
        return [(Kind.F, s - 1, mb)] if s > 0 else []
    if kind is Kind.B:
        return [(Kind.F, s, mb)] + ([(Kind.B, s + 1, mb)] if s < n_stages - 1 else [])
    return [(Kind.B, s, mb)]


def _squeeze(block: BuildingBlock, m: int, times: list[dict], with_w: bool) -> list[dict]:
    """Visit passes in slot order; move each to the earliest free slot after its dependencies if
    the rank's peak memory does not grow. Dependencies across ranks use the already-moved slots.

    ``with_w=False`` first lifts the W's out, squeezes only the cool-down (after rank 0's last
    first-stage F) and then refills the W's into the free slots, so the W's never block a B."""
    n_stages = block.p * len(block.placement[0])
    rank_of = {s: r for r, stages in enumerate(block.placement) for s in stages}
    limit = [_peak_of(block, times[r]) for r in range(block.p)]
    cooldown = times[0][(Kind.F, 0, m - 1)]
    if not with_w:
        times = [{k: t for k, t in tr.items() if k[0] is not Kind.W} for tr in times]
    order = sorted((t, r, key) for r in range(block.p) for key, t in times[r].items())
    for t, r, key in order:
        if not with_w and t <= cooldown:
            continue
        kind, s, mb = key
        earliest = 0
        for dep in _deps(kind, s, mb, n_stages):
            earliest = max(earliest, times[rank_of[dep[1]]][dep] + 1)
        if kind is not Kind.W and mb > 0:
            earliest = max(earliest, times[r][(kind, s, mb - 1)] + 1)
        used = {x for k, x in times[r].items() if k != key}
        for cand in range(earliest, t):
            if cand in used:
                continue
            times[r][key] = cand
            if _peak_of(block, times[r] if with_w else _with_w(times[r])) <= limit[r] + 1e-9:
                break
            times[r][key] = t
    return times if with_w else [_with_w(tr) for tr in times]


def _with_w(times: dict) -> dict:
    out = {k: t for k, t in times.items() if k[0] is not Kind.W}
    _fill_w(out, set(out.values()))
    return out


def _peak_of(block: BuildingBlock, times: dict) -> float:
    v = len(block.placement[0])
    cur = peak = 0.0
    for _, kind, _s in sorted((t, kind, s) for (kind, s, _mb), t in times.items()):
        if kind is Kind.F:
            cur += 1.0 / v
            peak = max(peak, cur)
        elif kind is Kind.W:
            cur -= 1.0 / v
    return peak


def v_block(name: str, p: int, step: int) -> BuildingBlock:
    """A V-shape block whose first forward leg advances ``step`` slots per rank (1: V-Min, 2: V-Half).

    Up the V (stages 0..p-1) F moves ``step`` slots per rank, down the V (p..2p-1) one slot; the
    backward mirrors it. A gap keeps the repeated block collision-free for p where the plain
    offsets would land two passes in the same slot modulo the interval (6).
    """
    placement = v_placement(p)
    gap = (2 if p % 3 == 0 else 0) if step == 1 else (3 if p % 2 == 0 else 0)
    offsets = []
    for r in range(p):
        lo, hi = placement[r]
        if step == 1:
            f0, f1 = r, 2 * p - 1 - r
            b1, b0 = 2 * p + gap + r, 4 * p + gap - 1 - r
        else:
            f0, f1 = 2 * r, 3 * p - 2 - r
            b1, b0 = 3 * p + gap - 1 + 2 * r, 6 * p + gap - 2 - r
        offsets.append({(Kind.F, lo): f0, (Kind.F, hi): f1, (Kind.B, hi): b1, (Kind.B, lo): b0})
    return BuildingBlock(name=name, p=p, interval=6, offsets=offsets, placement=placement)


def v_min(p: int, m: int) -> Schedule:
    return v_block("v-min", p, step=1).repeat(m)


def v_half(p: int, m: int) -> Schedule:
    return v_block("v-half", p, step=2).repeat(m)
