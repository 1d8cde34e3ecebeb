"""The activation planner: per block {keep, offload alpha, recompute} at the least predicted step time
under a device budget and a host-pool capacity. Pure data in, data out (property-tested).

Model per block i, from the warm-up's measurements (see :class:`BlockProfile`):

* keep: device S_i, no extra time.
* recompute: device I_i (its input), backward transient S_i, extra time F_i (one more forward).
* offload alpha: device 0; host H_i(alpha) = core_i + alpha*token_i + (1-alpha)*inputs_i (alpha=1: S_i);
  forward transient H_i (sources held until copied); extra time (1-alpha)*Ftok_i for the recomputed
  range plus the copy: all of H_i/bw on CPU (the copy thread shares the cores), on CUDA only what does
  not hide under the block's forward (D2H) and backward (~2 F_i, H2D), as in MEMO.

The peak walks forward (growing) then backward (shrinking) and takes the worst point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KEEP, OFFLOAD, RECOMPUTE = "keep", "offload", "recompute"


class PlanInfeasible(ValueError):
    """The budget cannot be met; ``smallest_feasible`` is the least budget the planner can meet."""

    def __init__(self, message: str, smallest_feasible: int):
        super().__init__(message)
        self.smallest_feasible = smallest_feasible


@dataclass(kw_only=True)
class BlockProfile:
    index: int
    saved_bytes: int
    """S: unique-storage bytes the block saves with no policy."""
    input_bytes: int
    """I: bytes of the block's input (what whole-block recompute keeps)."""
    forward_s: float
    """F: the block's forward time."""
    splittable: bool = False
    token_bytes: int = 0
    """Bytes saved by the per-token parts over all tokens."""
    core_bytes: int = 0
    """Bytes saved by attention's core (q, k, v, output, logsumexp): always offloaded whole when split."""
    split_input_bytes: int = 0
    """Bytes of the per-token parts' inputs over all tokens (x, attention output, dropout masks)."""
    token_forward_s: float = 0.0
    """Forward time of the per-token parts over all tokens."""
    recompute_bytes: int = 0
    """Device bytes one per-token part re-materializes in backward when all tokens are recomputed (the
    larger of the two parts: they are recomputed one after the other)."""

    def host_bytes(self, alpha: float) -> int:
        if alpha >= 1.0 or not self.splittable:
            return self.saved_bytes
        return int(self.core_bytes + alpha * self.token_bytes + (1 - alpha) * self.split_input_bytes)

    def recomputed_bytes(self, alpha: float) -> int:
        if alpha >= 1.0 or not self.splittable:
            return 0
        return int((1 - alpha) * self.recompute_bytes)


@dataclass(frozen=True)
class Choice:
    decision: str
    alpha: float | None = None


@dataclass(kw_only=True)
class PlanRow:
    index: int
    decision: str
    alpha: float | None
    device_bytes: int
    host_bytes: int
    recompute_s: float
    copy_s: float
    overhead_s: float


@dataclass(kw_only=True)
class Plan:
    mode: str
    rows: list[PlanRow]
    budget_bytes: int | None
    no_policy_peak: int
    predicted_peak: int
    predicted_overhead_s: float
    baseline_step_s: float
    bandwidth_bytes_per_s: float
    host_capacity: int
    host_bytes: int
    cuda: bool = False
    notes: list[str] = field(default_factory=list)

    def choices(self) -> list[Choice]:
        return [Choice(r.decision, r.alpha) for r in self.rows]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class CostModel:
    bandwidth: float
    cuda: bool = False

    def copy_s(self, p: BlockProfile, alpha: float) -> float:
        t = p.host_bytes(alpha) / self.bandwidth
        if not self.cuda:
            return t
        return max(0.0, t - p.forward_s) + max(0.0, t - 2 * p.forward_s)

    def overhead(self, p: BlockProfile, c: Choice) -> tuple[float, float]:
        """(recompute seconds, exposed copy seconds)."""
        if c.decision == KEEP:
            return 0.0, 0.0
        if c.decision == RECOMPUTE:
            return p.forward_s, 0.0
        rec = (1 - c.alpha) * p.token_forward_s if p.splittable and c.alpha < 1 else 0.0
        return rec, self.copy_s(p, c.alpha)

    def time(self, profiles: list[BlockProfile], choices: list[Choice]) -> float:
        return sum(sum(self.overhead(p, c)) for p, c in zip(profiles, choices))


def device_bytes(p: BlockProfile, c: Choice) -> int:
    return {KEEP: p.saved_bytes, RECOMPUTE: p.input_bytes}.get(c.decision, 0)


def host_bytes(p: BlockProfile, c: Choice) -> int:
    return p.host_bytes(c.alpha) if c.decision == OFFLOAD else 0


def peak_points(profiles: list[BlockProfile], choices: list[Choice], cuda: bool = False) -> list[int]:
    """Device-resident saved bytes at each point of one forward (per block) and backward (per block)."""
    dev = [device_bytes(p, c) for p, c in zip(profiles, choices)]
    host = [host_bytes(p, c) for p, c in zip(profiles, choices)]
    points, running = [], 0
    for i in range(len(profiles)):
        transient = host[i] + (host[i - 1] if cuda and i > 0 else 0)  # CUDA: previous block's D2H lags one
        points.append(running + max(dev[i], transient))
        running += dev[i]
    points.append(running)
    for i in reversed(range(len(profiles))):
        running -= dev[i]
        p, c = profiles[i], choices[i]
        if c.decision == OFFLOAD:
            back = p.recomputed_bytes(c.alpha) + (host[i] + (host[i - 1] if i > 0 else 0) if cuda else 0)
        else:
            back = p.saved_bytes
        points.append(running + back)
    return points


def predict_peak(profiles: list[BlockProfile], choices: list[Choice], cuda: bool = False) -> int:
    """Peak device-resident saved bytes over one forward and backward."""
    return max(peak_points(profiles, choices, cuda))


def options(p: BlockProfile, mode: str, alpha: float | None, steps: int) -> list[Choice]:
    if alpha is not None:
        alphas = [alpha if p.splittable else 1.0]
    elif p.splittable:
        alphas = [k / steps for k in range(steps + 1)]
    else:
        alphas = [1.0]
    offload = [Choice(OFFLOAD, a) for a in alphas]
    return {
        "none": [Choice(KEEP)],
        "recompute": [Choice(KEEP), Choice(RECOMPUTE)],
        "offload": [Choice(KEEP), *offload],
        "auto": [Choice(KEEP), Choice(RECOMPUTE), *offload],
    }[mode]


def memo_alpha(p: BlockProfile, cost: CostModel, steps: int) -> float:
    """MEMO's rule: the largest alpha whose transfer hides under the block's forward."""
    if not p.splittable:
        return 1.0
    for k in range(steps, -1, -1):
        if p.host_bytes(k / steps) / cost.bandwidth <= p.forward_s:
            return k / steps
    return 0.0


def plan_blocks(
    profiles: list[BlockProfile],
    *,
    mode: str,
    budget: int | None,
    host_capacity: int,
    cost: CostModel,
    alpha: float | None = None,
    alpha_steps: int = 8,
) -> list[Choice]:
    """Choices minimizing predicted overhead with peak <= budget and host bytes <= capacity."""
    opts = [options(p, mode, alpha, alpha_steps) for p in profiles]
    if budget is None:
        return _unbudgeted(profiles, mode, alpha, host_capacity, cost, alpha_steps)
    state = _meet(profiles, opts, budget, host_capacity, cost, by_time=True)
    if state is None:  # the time-greedy can get stuck where the byte-greedy does not
        state = _meet(profiles, opts, budget, host_capacity, cost, by_time=False)
    if state is None:
        smallest, floor = smallest_feasible_budget(profiles, opts, host_capacity, cost)
        if smallest > budget:
            raise PlanInfeasible(
                f"activation_budget={budget} bytes cannot be met: the smallest feasible budget is {smallest} bytes "
                f"with activations={mode!r} and a host pool of {host_capacity} bytes "
                f"(fix: set memory.activation_budget >= {smallest}, or allow more host memory / another mode)",
                smallest,
            )
        state = floor  # met a smaller budget, so it meets this one
    return _cheapen(state, opts, profiles, budget, host_capacity, cost)


def _meet(profiles, opts, budget, host_capacity, cost, *, by_time: bool) -> list[Choice] | None:
    """Greedy from keep-everywhere: take the move that removes the most bytes-over-budget (summed over
    every point of the step, so plateaus of the peak still make progress) per second of extra time."""
    state = [o[0] for o in opts]

    def excess(s):
        return sum(max(0, v - budget) for v in peak_points(profiles, s, cost.cuda))

    cur = excess(state)
    while cur > 0:
        best, best_score, best_excess = None, None, None
        base_time = cost.time(profiles, state)
        for i, o in enumerate(opts):
            for c in o:
                if c == state[i]:
                    continue
                new = state[:i] + [c] + state[i + 1 :]
                if sum(host_bytes(p, x) for p, x in zip(profiles, new)) > host_capacity:
                    continue
                e = excess(new)
                if e >= cur:
                    continue
                dt = cost.time(profiles, new) - base_time
                score = ((cur - e) / max(dt, 1e-12), -dt) if by_time else (cur - e, -dt)
                if best_score is None or score > best_score:
                    best, best_score, best_excess = new, score, e
        if best is None:
            return None
        state, cur = best, best_excess
    return state


def smallest_feasible_budget(profiles, opts, host_capacity, cost) -> tuple[int, list[Choice]]:
    """Binary search (to 0.5%) for the least budget the greedy can meet, and the choices meeting it."""
    floor = [o[0] for o in opts]
    hi = predict_peak(profiles, floor, cost.cuda)
    lo = 0
    while hi - lo > max(1, hi // 200):
        mid = (lo + hi) // 2
        state = _meet(profiles, opts, mid, host_capacity, cost, by_time=False)
        if state is not None:
            hi, floor = mid, state
        else:
            lo = mid
    return max(hi, predict_peak(profiles, floor, cost.cuda)), floor


def _cheapen(state, opts, profiles, budget, host_capacity, cost) -> list[Choice]:
    """Greedy repair: swap any block to a faster option while the budget and the pool still hold."""
    improved = True
    while improved:
        improved = False
        cur = cost.time(profiles, state)
        for i, o in enumerate(opts):
            for c in o:
                new = state[:i] + [c] + state[i + 1 :]
                if cost.time(profiles, new) >= cur - 1e-12:
                    continue
                if predict_peak(profiles, new, cost.cuda) > budget:
                    continue
                if sum(host_bytes(p, x) for p, x in zip(profiles, new)) > host_capacity:
                    continue
                state, cur, improved = new, cost.time(profiles, new), True
    return state


def _unbudgeted(profiles, mode, alpha, host_capacity, cost, steps) -> list[Choice]:
    if mode == "none":
        return [Choice(KEEP) for _ in profiles]
    if mode == "recompute":
        return [Choice(RECOMPUTE) for _ in profiles]
    if mode != "offload":
        raise ValueError(f"activations={mode!r} needs activation_budget")
    state = [Choice(OFFLOAD, alpha if (alpha is not None and p.splittable) else memo_alpha(p, cost, steps))
             for p in profiles]
    # MEMO's host-fit rule: lower alpha on the largest host users until the pool fits
    while sum(host_bytes(p, c) for p, c in zip(profiles, state)) > host_capacity:
        movable = [i for i, (p, c) in enumerate(zip(profiles, state)) if p.splittable and c.alpha > 0 and alpha is None]
        if not movable:
            need = sum(host_bytes(p, c) for p, c in zip(profiles, state))
            raise PlanInfeasible(
                f"host_pool_bytes: the pool ({host_capacity} usable bytes) is too small: offloading every block needs "
                f"at least {need} bytes "
                "(fix: raise memory.host_pool_bytes, set an activation_budget, or use activations='auto')",
                0,
            )
        i = max(movable, key=lambda j: host_bytes(profiles[j], state[j]))
        state[i] = Choice(OFFLOAD, max(0.0, state[i].alpha - 1 / steps))
    return state


def build_plan(profiles, choices, *, mode, budget, no_policy_peak, cost, host_capacity, baseline_step_s) -> Plan:
    rows = []
    for p, c in zip(profiles, choices):
        rec, cp = cost.overhead(p, c)
        rows.append(PlanRow(index=p.index, decision=c.decision, alpha=c.alpha, device_bytes=device_bytes(p, c),
                            host_bytes=host_bytes(p, c), recompute_s=rec, copy_s=cp, overhead_s=rec + cp))
    return Plan(
        mode=mode, rows=rows, budget_bytes=budget, no_policy_peak=no_policy_peak,
        predicted_peak=predict_peak(profiles, choices, cost.cuda),
        predicted_overhead_s=sum(r.overhead_s for r in rows), baseline_step_s=baseline_step_s,
        bandwidth_bytes_per_s=cost.bandwidth, host_capacity=host_capacity,
        host_bytes=sum(r.host_bytes for r in rows), cuda=cost.cuda,
    )
