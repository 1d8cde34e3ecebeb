"""Simulator ground truth (equal costs, comm 0) and the search."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainmem.parallel import (SCHEDULE_NAMES, Costs, DeadlockError, Kind, make_schedule, order_peak, pick, simulate, v_block,
                               validate, with_offload)

CASES = [(2, 4), (3, 6), (4, 8), (4, 12), (2, 8)]


def _sim(name, p, m, v=None):
    sched = make_schedule(name, p, m, v)
    validate(sched)
    return simulate(sched, Costs(f=1, b=1, w=1))


@pytest.mark.parametrize("p,m", CASES + [(4, 2)])
def test_gpipe_and_1f1b(p, m):
    for name in ("gpipe", "1f1b"):
        res = _sim(name, p, m)
        assert res.bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert _sim("gpipe", p, m).peak_mb == [m] * p
    assert _sim("1f1b", p, m).peak_mb == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 3), (3, 6, 4)])
def test_interleaved(p, m, v):
    res = _sim("interleaved", p, m, v)
    assert res.bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    assert res.peak_mb[0] == pytest.approx(p + (p - 1) / v)


@pytest.mark.parametrize("p,m", CASES)
def test_zero_bubble_family(p, m):
    h1 = _sim("zb-h1", p, m)
    assert h1.bubble == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)
    assert h1.peak_mb == [p] * p
    if m >= 2 * p:
        h2 = _sim("zb-h2", p, m)
        assert h2.bubble == pytest.approx(0.0, abs=1e-12)
        assert h2.peak_mb == [2 * p] * p


@pytest.mark.parametrize("p", range(2, 17))
def test_zb_v_is_zero_bubble_with_peak_p(p):
    for m in (2 * p, 3 * p):
        res = _sim("zb-v", p, m)
        assert res.bubble == pytest.approx(0.0, abs=1e-12), f"p={p} m={m}"
        assert res.peak_mb == [p] * p, f"p={p} m={m}"
        # zero bubble: every rank is busy from its first to its last action, 3m half-unit passes x 2
        assert all(b == pytest.approx(0.0, abs=1e-12) for b in res.bubble_per_rank)


def test_table_figures_p4_m8():
    assert round(_sim("1f1b", 4, 8).bubble, 4) == 0.2727
    assert round(_sim("zb-h1", 4, 8).bubble, 4) == 0.1111
    assert round(_sim("v-half", 4, 8).bubble, 4) == 0.0943
    assert round(_sim("v-min", 4, 8).bubble, 4) == 0.1864


@pytest.mark.parametrize("p", range(2, 17))
def test_v_shapes_memory(p):
    m = 2 * p
    half, vmin = _sim("v-half", p, m), _sim("v-min", p, m)
    assert max(half.peak_mb) == (p + 2) // 2
    assert max(vmin.peak_mb) == (p + 4) // 3
    one = _sim("1f1b", p, m)
    assert max(half.peak_mb) <= max(one.peak_mb)
    # the block's lifespan bound holds for the repeated schedule
    for step, res in ((2, half), (1, vmin)):
        bound = v_block("x", p, step).predicted_peak_mb(m)
        assert all(a <= b + 1e-9 for a, b in zip(res.peak_mb, bound))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 16), st.data())
def test_v_shapes_and_zb_v_at_random_p_and_m(p, data):
    m = data.draw(st.integers(1, 3 * p), label="m")
    name = data.draw(st.sampled_from(["zb-v", "v-half", "v-min"]), label="schedule")
    res = _sim(name, p, m)  # validates: dependencies, p2p order, deadlock freedom
    bound = {"zb-v": p, "v-half": (p + 2) // 2, "v-min": (p + 4) // 3}[name]
    assert max(res.peak_mb) <= bound + 1e-9
    if name == "zb-v" and m >= 2 * p - 1:
        assert res.bubble == pytest.approx(0.0, abs=1e-12) and res.peak_mb == [p] * p


def test_costs_scale_time_not_bubble_shape():
    sched = make_schedule("1f1b", 4, 8)
    slow_b = simulate(sched, Costs(f=1, b=2, w=0))
    assert slow_b.makespan == pytest.approx(3 * (8 + 3))  # BW = 2, F = 1 per step
    comm = simulate(sched, Costs(f=1, b=1, w=1, comm=0.5))
    assert comm.makespan > simulate(sched).makespan


def test_offload_lowers_peak_and_costs_time_when_copies_are_slow():
    sched = make_schedule("1f1b", 4, 8)
    off = with_offload(sched)
    validate(off)
    base = simulate(sched)
    fast = simulate(off, Costs(offload=0.1))
    # every stash but the last stage's (its backward follows at once) leaves between F and backward
    assert order_peak(off) == fast.peak_mb == [1.0, 1.0, 1.0, 1.0] and base.peak_mb == [4.0, 3.0, 2.0, 1.0]
    # a reload waits for the offload before it (never two stashes on the device): each microbatch
    # of ranks 0-2 exposes at most its two copies
    assert base.makespan < fast.makespan <= base.makespan + 2 * 0.1 * 8
    slow = simulate(off, Costs(offload=5.0))
    assert slow.makespan > fast.makespan and slow.peak_mb == fast.peak_mb


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SCHEDULE_NAMES), p=st.integers(2, 6), extra=st.integers(0, 6),
       f=st.floats(0.1, 3), b=st.floats(0.1, 3), copy=st.floats(0.0, 4), prefetch=st.integers(0, 3),
       pick=st.integers(0, 2 ** 16))
def test_offloaded_schedules_peak_as_their_action_order_says(name, p, extra, f, b, copy, prefetch, pick):
    """Whatever the copy times, the simulator's timed peak equals order_peak's (an F or RELOAD
    waits for earlier offloads), and the peak-preserving reload placement never raises the peak
    of the latest placement (prefetch 0)."""
    m = p * (1 + extra // 3) if name == "interleaved" else p + extra
    sched = make_schedule(name, p, m)
    stashes = [(a.stage, a.mb) for acts in sched.ranks for a in acts if a.kind is Kind.F]
    chosen = {k for i, k in enumerate(stashes) if (pick >> (i % 16)) & 1}
    off = with_offload(sched, chosen, prefetch=prefetch)
    validate(off)
    assert simulate(off, Costs(f=f, b=b, w=b, offload=copy)).peak_mb == pytest.approx(order_peak(off))
    latest = with_offload(sched, chosen, prefetch=0)
    assert order_peak(off) == pytest.approx(order_peak(latest))
    assert all(x <= y + 1e-9 for x, y in zip(order_peak(off), order_peak(sched)))


def test_pick_fits_budget_and_prefers_fastest():
    costs = Costs(f=1, b=1, w=1, offload=0.5)
    best, cands = pick(4, 8, 3.0, costs)
    assert best is not None and max(best.sim.peak_mb) <= 3.0
    fits = [c for c in cands if max(c.sim.peak_mb) <= 3.0]
    assert best.sim.makespan == min(c.sim.makespan for c in fits)
    none, _ = pick(4, 8, 0.1, costs)
    assert none is None
    no_off, _ = pick(4, 8, 2.0, costs, offload=False)
    assert no_off.name == "v-min" and not no_off.offload


def test_cross_rank_cycle_is_rejected_with_names():
    from trainmem.parallel import ScheduleError

    sched = make_schedule("1f1b", 2, 2)
    act = sched.act
    # rank 0 waits for mb 0's grad before sending mb 1; rank 1 waits for mb 1 before sending that grad
    r0 = [act(Kind.F, 0, 0), act(Kind.BW, 0, 0), act(Kind.F, 0, 1), act(Kind.BW, 0, 1)]
    r1 = [act(Kind.F, 1, 0), act(Kind.F, 1, 1), act(Kind.BW, 1, 0), act(Kind.BW, 1, 1)]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 action #\d+ 0RECV_B0 waits for 1SEND_B0 from rank 1"):
        validate(sched.with_ranks([r0, r1]))


def test_simulator_deadlock_error_names_rank_and_peer():
    from trainmem.parallel import add_comms

    sched = add_comms(make_schedule("1f1b", 2, 2))
    r0 = [a for a in sched.ranks[0] if not (a.kind is Kind.SEND_F and a.mb == 1)]
    with pytest.raises(DeadlockError, match=r"rank 1 .*RECV_F1 waits for 0SEND_F1 from rank 0"):
        simulate(sched.with_ranks([r0, sched.ranks[1]]))
    assert math.isfinite(simulate(sched).makespan)


def test_selective_offload_keeps_what_its_copy_cannot_hide_under():
    from trainmem.parallel import StageCost, lifespans, selective_offload

    sched = make_schedule("1f1b", 4, 8)
    costs = [StageCost(f=1.0, b=1.0, w=1.0, saved_bytes=1000) for _ in range(4)]
    spans = lifespans(sched, costs)
    assert all(spans[(3, mb)] == 0 for mb in range(8))  # the last stage's backward follows its F at once
    assert min(spans[(0, mb)] for mb in range(8)) >= 2 * 3.0  # rank 0: three F+BW slots before its BW
    fast = selective_offload(sched, costs, copy_bytes_per_s=1e6)
    chosen = {(a.stage, a.mb) for acts in fast.ranks for a in acts if a.kind is Kind.OFFLOAD}
    assert chosen == {(s, mb) for s in range(3) for mb in range(8)}
    assert order_peak(fast, {s: 1000 for s in range(4)}) == [1000, 1000, 1000, 1000]
    # a round trip of 5.5 s: longer than any of rank 2's lifespans (3 s, 5 s in the warm-up), shorter
    # than rank 1's (6 s and more): only ranks 0 and 1 offload
    mid = selective_offload(sched, costs, copy_bytes_per_s=2 * 1000 / 5.5)
    assert {a.stage for acts in mid.ranks for a in acts if a.kind is Kind.OFFLOAD} == {0, 1}
    none = selective_offload(sched, costs, copy_bytes_per_s=1.0)
    assert not any(a.kind is Kind.OFFLOAD for acts in none.ranks for a in acts)
    with pytest.raises(ValueError, match="copy_bytes_per_s"):
        selective_offload(sched, costs, copy_bytes_per_s=0)


def test_pipeline_offload_setting():
    from trainmem.parallel import PipelineConfig, StageCost, build_schedule

    assert PipelineConfig(offload=True).offload == "all" and PipelineConfig(offload=False).offload == "none"
    with pytest.raises(ValueError, match="offload='some'"):
        PipelineConfig(offload="some")
    cfg = PipelineConfig(stages=2, microbatches=4, offload="selective")
    with pytest.raises(ValueError, match="selective"):
        build_schedule(cfg)
    sched = build_schedule(cfg, [StageCost(f=1, b=1, w=1, saved_bytes=10)] * 2, copy_bytes_per_s=1e9)
    assert any(a.kind is Kind.OFFLOAD for a in sched.ranks[0]) and not any(a.kind is Kind.OFFLOAD for a in sched.ranks[1])
