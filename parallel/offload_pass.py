"""Offload inside the schedule (PipeOffload-style): stash to host after F, reload before backward."""

from __future__ import annotations

from .ir import Action, Kind, Schedule


def with_offload(schedule: Schedule, min_gap: int = 2, prefetch: int = 1) -> Schedule:
    """Insert OFFLOAD right after each F whose first backward is more than ``min_gap`` compute
    actions away, and RELOAD ``prefetch`` compute actions before that backward (so the copy
    overlaps compute). The stash stays resident from its RELOAD to its W/BW."""
    ranks = []
    for acts in schedule.ranks:
        compute = [a for a in acts if a.kind in (Kind.F, Kind.B, Kind.W, Kind.BW)]
        pos = {(a.kind, a.stage, a.mb): i for i, a in enumerate(compute)}
        after: dict[int, list[Action]] = {}
        before: dict[int, list[Action]] = {}
        for i, a in enumerate(compute):
            if a.kind is not Kind.F:
                continue
            back = pos.get((Kind.BW, a.stage, a.mb), pos.get((Kind.B, a.stage, a.mb)))
            at = back - prefetch if back is not None else None
            if back is None or back - i <= min_gap or at <= i + 1:
                continue  # too close to its backward for an offload to free anything
            after.setdefault(i, []).append(Action(a.stage, Kind.OFFLOAD, a.mb, a.chunk))
            before.setdefault(at, []).append(Action(a.stage, Kind.RELOAD, a.mb, a.chunk))
        row: list[Action] = []
        for i, a in enumerate(compute):
            row += before.get(i, [])
            row.append(a)
            row += after.get(i, [])
        ranks.append(row)
    return schedule.with_ranks(ranks, name=schedule.name + "+offload")


def is_offloaded(schedule: Schedule) -> bool:
    return any(a.kind is Kind.OFFLOAD for acts in schedule.ranks for a in acts)


__all__ = ["with_offload", "is_offloaded"]
