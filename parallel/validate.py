"""Validator: dependencies, matched send/recv pairs posted in the same order by both ranks of a
pair, and deadlock freedom.

Every error names the rank, the action (with its index in that rank's list) and what is missing.
"""

from __future__ import annotations

from collections import Counter

from .comms import has_comms, order_mismatch
from .ir import BACKWARD, COMM, Action, DeadlockError, Kind, Schedule
from .simulate import simulate


class ScheduleError(ValueError):
    """A schedule that cannot run: the message names rank, action and the missing dependency."""


def _missing(r: int, i: int, a: Action, dep: str, why: str) -> ScheduleError:
    return ScheduleError(f"rank {r} action #{i} {a}: missing dependency {dep} ({why})")


def _check_coverage(schedule: Schedule) -> None:
    owned = {r: set(stages) for r, stages in enumerate(schedule.placement)}
    count: Counter = Counter()
    for r, acts in enumerate(schedule.ranks):
        for i, a in enumerate(acts):
            if a.stage not in owned[r]:
                raise ScheduleError(f"rank {r} action #{i} {a}: stage {a.stage} lives on rank {schedule.rank_of(a.stage)}, not here")
            if not 0 <= a.mb < schedule.m:
                raise ScheduleError(f"rank {r} action #{i} {a}: microbatch {a.mb} is outside 0..{schedule.m - 1}")
            count[(a.kind, a.stage, a.mb)] += 1
            if count[(a.kind, a.stage, a.mb)] > 1 and a.kind not in (Kind.OFFLOAD, Kind.RELOAD):
                raise ScheduleError(f"rank {r} action #{i} {a}: appears twice")
    for s in range(schedule.n_stages):
        r = schedule.rank_of(s)
        for mb in range(schedule.m):
            if not count[(Kind.F, s, mb)]:
                raise ScheduleError(f"rank {r}: stage {s} microbatch {mb} has no forward {s}F{mb}")
            fused, b, w = count[(Kind.BW, s, mb)], count[(Kind.B, s, mb)], count[(Kind.W, s, mb)]
            if not (fused == 1 and b == w == 0) and not (fused == 0 and b == w == 1):
                raise ScheduleError(
                    f"rank {r}: stage {s} microbatch {mb} needs one {s}BW{mb} or one {s}B{mb} and one {s}W{mb}")


def _check_order(schedule: Schedule) -> None:
    comms = has_comms(schedule)
    last = schedule.n_stages - 1
    sends = {(a.kind, a.stage, a.mb) for acts in schedule.ranks for a in acts if a.kind in (Kind.SEND_F, Kind.SEND_B)}
    for r, acts in enumerate(schedule.ranks):
        seen: set[tuple[Kind, int, int]] = set()
        offloaded: set[tuple[int, int]] = set()
        for i, a in enumerate(acts):
            s, mb = a.stage, a.mb
            back = (Kind.BW if (Kind.BW, s, mb) in seen or _kind_in(acts, Kind.BW, s, mb) else Kind.B)
            need: list[tuple[tuple[Kind, int, int], str]] = []
            if a.kind is Kind.F and s > 0:
                if schedule.rank_of(s - 1) == r:
                    need.append(((Kind.F, s - 1, mb), "the previous stage's forward on this rank"))
                elif comms:
                    need.append(((Kind.RECV_F, s, mb), "its input must be received first"))
            if a.kind in BACKWARD:
                need.append(((Kind.F, s, mb), "forward before backward"))
                if s < last:
                    if schedule.rank_of(s + 1) == r:
                        nb = Kind.BW if _kind_in(acts, Kind.BW, s + 1, mb) else Kind.B
                        need.append(((nb, s + 1, mb), "the next stage's backward on this rank"))
                    elif comms:
                        need.append(((Kind.RECV_B, s, mb), "its output grad must be received first"))
            if a.kind is Kind.W:
                need.append(((Kind.B, s, mb), "B before W"))
            if a.kind is Kind.SEND_F:
                need.append(((Kind.F, s, mb), "send after the forward that produces it"))
            if a.kind is Kind.SEND_B:
                need.append(((back, s, mb), "send after the backward that produces it"))
            if a.kind in (Kind.OFFLOAD, Kind.RELOAD):
                need.append(((Kind.F, s, mb), "offload/reload only a stash that exists"))
            for dep, why in need:
                if dep not in seen:
                    d = Action(dep[1], dep[0], dep[2])
                    raise _missing(r, i, a, str(d), why)
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                want = (Kind.SEND_F, s - 1, mb) if a.kind is Kind.RECV_F else (Kind.SEND_B, s + 1, mb)
                if want not in sends:
                    d = Action(want[1], want[0], want[2])
                    raise _missing(r, i, a, str(d), f"no matching send on rank {schedule.rank_of(want[1])}")
            if a.kind in (Kind.B, Kind.BW, Kind.W) and (s, mb) in offloaded:
                raise _missing(r, i, a, f"{s}RELOAD{mb}", "its stash is offloaded")
            if a.kind is Kind.OFFLOAD:
                if (s, mb) in offloaded or (Kind.W, s, mb) in seen or (Kind.BW, s, mb) in seen:
                    raise ScheduleError(f"rank {r} action #{i} {a}: the stash is not resident here")
                offloaded.add((s, mb))
            if a.kind is Kind.RELOAD:
                if (s, mb) not in offloaded:
                    raise _missing(r, i, a, f"{s}OFFLOAD{mb}", "reload needs an earlier offload")
                offloaded.discard((s, mb))
            seen.add((a.kind, s, mb))


def _kind_in(acts: list[Action], kind: Kind, s: int, mb: int) -> bool:
    return any(a.kind is kind and a.stage == s and a.mb == mb for a in acts)


def _check_pairs(schedule: Schedule) -> None:
    if not has_comms(schedule):
        return
    present = {(a.kind, a.stage, a.mb): r for r, acts in enumerate(schedule.ranks) for a in acts if a.kind in COMM}
    for (kind, s, mb), r in present.items():
        if kind is Kind.SEND_F and (Kind.RECV_F, s + 1, mb) not in present:
            raise ScheduleError(f"rank {r} action {s}SEND_F{mb}: no matching {s + 1}RECV_F{mb} on rank {schedule.rank_of(s + 1)}")
        if kind is Kind.SEND_B and (Kind.RECV_B, s - 1, mb) not in present:
            raise ScheduleError(f"rank {r} action {s}SEND_B{mb}: no matching {s - 1}RECV_B{mb} on rank {schedule.rank_of(s - 1)}")
    for s in range(schedule.n_stages - 1):
        if schedule.rank_of(s) == schedule.rank_of(s + 1):
            continue
        for mb in range(schedule.m):
            if (Kind.SEND_F, s, mb) not in present:
                r = schedule.rank_of(s)
                raise ScheduleError(f"rank {r} action {s}F{mb}: missing dependency {s}SEND_F{mb} (rank {schedule.rank_of(s + 1)} needs it)")
            if (Kind.SEND_B, s + 1, mb) not in present:
                r = schedule.rank_of(s + 1)
                raise ScheduleError(f"rank {r} backward of stage {s + 1} mb {mb}: missing dependency {s + 1}SEND_B{mb}")


def validate(schedule: Schedule) -> Schedule:
    """Raise ScheduleError if ``schedule`` cannot run; return it unchanged otherwise."""
    if len(schedule.ranks) != schedule.p or len(schedule.placement) != schedule.p:
        raise ScheduleError(f"schedule has {len(schedule.ranks)} rank lists for p={schedule.p}")
    _check_coverage(schedule)
    _check_order(schedule)
    _check_pairs(schedule)
    if has_comms(schedule) and (why := order_mismatch(schedule)):
        raise ScheduleError(why)
    try:
        simulate(schedule)
    except DeadlockError as exc:
        raise ScheduleError(str(exc)) from None
    return schedule
