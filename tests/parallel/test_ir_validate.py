"""IR text/CSV forms, validator errors, and hypothesis properties over random schedules."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainmem.parallel import (SCHEDULE_NAMES, Action, Kind, ScheduleError, add_comms, from_csv, greedy,
                               loop_placement, make_schedule, simulate, to_csv, v_placement, validate,
                               with_offload)


def test_text_round_trip():
    a = Action.parse("3BW7")
    assert (a.stage, a.kind, a.mb) == (3, Kind.BW, 7) and str(a) == "3BW7"
    assert str(Action.parse("12SEND_F0")) == "12SEND_F0"
    with pytest.raises(ValueError, match="action='3X7'"):
        Action.parse("3X7")


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("torch_names", [False, True])
def test_csv_round_trip(name, torch_names):
    sched = add_comms(make_schedule(name, 4, 8))
    text = to_csv(sched, torch_names=torch_names)
    assert len(text.strip().splitlines()) == 4
    back = from_csv(text, name=name, m=8, placement=sched.placement, torch_names=torch_names)
    assert back.ranks == sched.ranks
    assert [[a.chunk for a in row] for row in back.ranks] == [[a.chunk for a in row] for row in sched.ranks]
    validate(back)


def test_torch_letters():
    sched = make_schedule("zb-h1", 2, 2)
    row0 = to_csv(sched, torch_names=True).splitlines()[0].split(",")
    assert "0I0" in row0 and "0W0" in row0  # our B (input grad) is torch's I
    assert "0B0" in to_csv(make_schedule("1f1b", 2, 2), torch_names=True)  # our fused BW is torch's B


def test_validator_names_rank_action_and_missing_dependency():
    sched = make_schedule("1f1b", 2, 4)
    r1 = list(sched.ranks[1])
    first_bw = next(i for i, a in enumerate(r1) if a.kind is Kind.BW)
    bw = r1.pop(first_bw)
    r1.insert(0, bw)  # backward before its own forward
    with pytest.raises(ScheduleError, match=r"rank 1 action #0 1BW0: missing dependency 1F0"):
        validate(sched.with_ranks([sched.ranks[0], r1]))
    with pytest.raises(ScheduleError, match=r"rank 0: stage 0 microbatch 3 has no forward 0F3"):
        validate(sched.with_ranks([[a for a in sched.ranks[0] if str(a) != "0F3"], sched.ranks[1]]))
    comm = add_comms(sched)
    r0 = [a for a in comm.ranks[0] if str(a) != "0SEND_F2"]
    with pytest.raises(ScheduleError, match=r"rank 1 action #\d+ 1RECV_F2: missing dependency 0SEND_F2"):
        validate(comm.with_ranks([r0, comm.ranks[1]]))


def test_offload_order_is_checked():
    sched = make_schedule("gpipe", 2, 2)
    act = sched.act
    r0 = [act(Kind.F, 0, 0), act(Kind.OFFLOAD, 0, 0), act(Kind.F, 0, 1), act(Kind.BW, 0, 0), act(Kind.BW, 0, 1)]
    with pytest.raises(ScheduleError, match=r"rank 0 action #3 0BW0: missing dependency 0RELOAD0"):
        validate(sched.with_ranks([r0, sched.ranks[1]]))


# ---- hypothesis ---------------------------------------------------------------------------------

def random_schedules(min_p: int = 1):
    """Valid by construction: the greedy list scheduler with random priorities and no memory cap
    (or a named generator), optionally with offload and explicit send/recv."""
    return _random_schedule(min_p)


@st.composite
def _random_schedule(draw, min_p):
    p = draw(st.integers(min_p, 4))
    m = draw(st.integers(1, 5))
    if draw(st.booleans()):
        name = draw(st.sampled_from(SCHEDULE_NAMES))
        try:
            sched = make_schedule(name, p, m)
        except ValueError:
            sched = make_schedule("1f1b", p, m)
    else:
        shape = draw(st.sampled_from(["loop1", "loop2", "v"]))
        placement = {"loop1": loop_placement(p, 1), "loop2": loop_placement(p, 2), "v": v_placement(p)}[shape]
        seed = draw(st.integers(0, 2**31 - 1))
        table: dict = {}
        rng = random.Random(seed)

        def prio(kind, s, mb, n):
            return table.setdefault((kind, s, mb), rng.random())

        sched = greedy("random", p, m, placement, cap=float(10 * m), split=draw(st.booleans()), prio=prio)
    if draw(st.booleans()):
        sched = with_offload(sched, min_gap=draw(st.integers(0, 3)))
    return add_comms(sched) if draw(st.booleans()) else sched


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_schedules())
def test_random_valid_schedules_pass(sched):
    validate(sched)
    res = simulate(sched)
    assert 0.0 <= res.bubble < 1.0


def _same_rank_deps(sched, r, a):
    """Actions on rank r that must precede a (same-rank dependencies only)."""
    s, mb = a.stage, a.mb
    if a.kind is Kind.F and s > 0 and sched.rank_of(s - 1) == r:
        return [(Kind.F, s - 1, mb)]
    if a.kind in (Kind.B, Kind.BW, Kind.SEND_F, Kind.OFFLOAD):
        return [(Kind.F, s, mb)]
    if a.kind is Kind.W:
        return [(Kind.B, s, mb)]
    if a.kind is Kind.SEND_B:
        return [(Kind.B, s, mb), (Kind.BW, s, mb)]
    if a.kind is Kind.RELOAD:
        return [(Kind.OFFLOAD, s, mb)]
    return []


@st.composite
def _mutated(draw, how):
    """A valid schedule broken one way; the target is drawn among the actions the mutation applies
    to, so every example is a real break (no example is skipped)."""
    sched = draw(random_schedules(min_p=2 if how == "wrong_rank" else 1))
    rows = [list(r) for r in sched.ranks]
    keys = [[(x.kind, x.stage, x.mb) for x in row] for row in rows]
    targets = [(r, i) for r, row in enumerate(rows) for i, a in enumerate(row)
               if how != "before_dep" or any(d in keys[r][:i] for d in _same_rank_deps(sched, r, a))]
    r, i = draw(st.sampled_from(targets))
    a = rows[r][i]
    if how == "drop":
        del rows[r][i]
    elif how == "dup":
        rows[r].insert(i, a)
    elif how == "before_dep":
        first = min(keys[r].index(d) for d in _same_rank_deps(sched, r, a) if d in keys[r][:i])
        del rows[r][i]
        rows[r].insert(first, a)
    else:
        del rows[r][i]
        rows[(r + 1) % sched.p].insert(0, a)
    return sched.with_ranks(rows)


@pytest.mark.parametrize("how", ["drop", "dup", "before_dep", "wrong_rank"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_breaking_mutations_are_rejected(how, data):
    broken = data.draw(_mutated(how))
    with pytest.raises(ScheduleError, match=r"rank \d+"):
        validate(broken)
