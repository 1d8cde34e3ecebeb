"""Property tests of the planner: every plan it returns meets the budget and the pool; it never claims
an infeasible budget feasible nor reports a smallest budget below the true minimum."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from trainmem.offload import BlockProfile, Choice, CostModel, PlanInfeasible, plan_blocks, predict_peak
from trainmem.offload.activations.planner import host_bytes, options


@st.composite
def profiles(draw, max_blocks=6):
    n = draw(st.integers(1, max_blocks))
    out = []
    for i in range(n):
        tok = draw(st.integers(1_000, 1_000_000))
        core = draw(st.integers(100, 500_000))
        inp = draw(st.integers(10, tok))
        out.append(BlockProfile(
            index=i, saved_bytes=tok + core, input_bytes=draw(st.integers(10, inp)),
            forward_s=draw(st.floats(1e-4, 1.0)), splittable=draw(st.booleans()), token_bytes=tok,
            core_bytes=core, split_input_bytes=inp, token_forward_s=draw(st.floats(1e-5, 0.9)),
            recompute_bytes=draw(st.integers(0, tok - inp)),
        ))
    return out


MODES = st.sampled_from(["recompute", "offload", "auto"])


@settings(max_examples=150, deadline=None)
@given(profiles(), MODES, st.floats(0.05, 1.0), st.floats(0.0, 1.5), st.booleans(), st.floats(1e8, 1e11))
def test_plans_meet_budget_and_pool(ps, mode, fraction, host_fraction, cuda, bw):
    cost = CostModel(bandwidth=bw, cuda=cuda)
    keep_peak = predict_peak(ps, [Choice("keep")] * len(ps), cuda)
    assert keep_peak == sum(p.saved_bytes for p in ps)
    budget = int(fraction * keep_peak)
    capacity = int(host_fraction * sum(p.saved_bytes for p in ps))
    try:
        choices = plan_blocks(ps, mode=mode, budget=budget, host_capacity=capacity, cost=cost, alpha_steps=4)
    except PlanInfeasible as e:
        assert e.smallest_feasible > budget * 0.99
        again = plan_blocks(ps, mode=mode, budget=e.smallest_feasible, host_capacity=capacity, cost=cost,
                            alpha_steps=4)
        assert predict_peak(ps, again, cuda) <= e.smallest_feasible
        return
    assert predict_peak(ps, choices, cuda) <= budget
    assert sum(host_bytes(p, c) for p, c in zip(ps, choices)) <= capacity
    for p, c in zip(ps, choices):
        assert c in options(p, mode, None, 4)


@settings(max_examples=80, deadline=None)
@given(profiles(max_blocks=3), MODES, st.floats(0.05, 1.0), st.floats(0.0, 1.5))
def test_never_below_the_true_minimum(ps, mode, fraction, host_fraction):
    cost = CostModel(bandwidth=1e9)
    budget = int(fraction * sum(p.saved_bytes for p in ps))
    capacity = int(host_fraction * sum(p.saved_bytes for p in ps))
    feasible = [
        combo for combo in itertools.product(*(options(p, mode, None, 2) for p in ps))
        if sum(host_bytes(p, c) for p, c in zip(ps, combo)) <= capacity
    ]
    true_min = min(predict_peak(ps, list(c)) for c in feasible)
    try:
        plan_blocks(ps, mode=mode, budget=budget, host_capacity=capacity, cost=cost, alpha_steps=2)
    except PlanInfeasible as e:
        assert e.smallest_feasible >= true_min
        return
    assert true_min <= budget  # a plan was returned, so the budget really was feasible


def test_offload_without_budget_follows_memo_rule():
    slow_link = CostModel(bandwidth=1e6)  # 1 MB/s: only a small alpha hides under a 0.1 s forward
    p = BlockProfile(index=0, saved_bytes=1_100_000, input_bytes=10_000, forward_s=0.1, splittable=True,
                     token_bytes=1_000_000, core_bytes=50_000, split_input_bytes=20_000, token_forward_s=0.05)
    (c,) = plan_blocks([p], mode="offload", budget=None, host_capacity=10**9, cost=slow_link, alpha_steps=8)
    assert p.host_bytes(c.alpha) / 1e6 <= 0.1 < p.host_bytes(c.alpha + 1 / 8) / 1e6
    (fast,) = plan_blocks([p], mode="offload", budget=None, host_capacity=10**9, cost=CostModel(bandwidth=1e12))
    assert fast.alpha == 1.0
