"""Schedule generators: GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZB-V (the paper's construction), and a
memory-capped greedy list scheduler (ZB-H2; zero-bubble: B/W split, W deferred into idle time).

V-Half and V-Min come from building blocks (``blocks.py``).
"""

from __future__ import annotations

from .ir import Action, DeadlockError, Kind, Schedule, loop_placement, v_placement
from .simulate import Costs, simulate


def _sched(name: str, p: int, m: int, placement: list[list[int]], ranks: list[list[tuple[Kind, int, int]]]) -> Schedule:
    owner = {s: c for stages in placement for c, s in enumerate(stages)}
    acts = [[Action(s, k, mb, owner[s]) for k, s, mb in row] for row in ranks]
    return Schedule(name=name, p=p, m=m, placement=placement, ranks=acts)


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards: peak m, bubble (p-1)/(m+p-1)."""
    ranks = [[(Kind.F, r, i) for i in range(m)] + [(Kind.BW, r, i) for i in range(m)] for r in range(p)]
    return _sched("gpipe", p, m, loop_placement(p, 1), ranks)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B: rank r runs p-r-1 warm-up forwards, then alternates; holds min(p-r, m) stashes."""
    ranks = []
    for r in range(p):
        warm = min(p - r - 1, m)
        row = [(Kind.F, r, i) for i in range(warm)]
        for i in range(m - warm):
            row += [(Kind.F, r, warm + i), (Kind.BW, r, i)]
        row += [(Kind.BW, r, i) for i in range(m - warm, m)]
        ranks.append(row)
    return _sched("1f1b", p, m, loop_placement(p, 1), ranks)


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron's interleaved 1F1B over v virtual stages per rank (needs m % p == 0)."""
    if m % p:
        raise ValueError(f"m={m} must be a multiple of p={p} for interleaved 1F1B")
    placement = loop_placement(p, v)
    total = v * m

    def unit(k: int, forward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk = within // p
        return (chunk if forward else v - 1 - chunk), group * p + within % p

    ranks = []
    for r in range(p):
        warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        row: list[tuple[Kind, int, int]] = []
        nf = nb = 0

        def fwd() -> None:
            nonlocal nf
            c, mb = unit(nf, True)
            row.append((Kind.F, placement[r][c], mb))
            nf += 1

        def bwd() -> None:
            nonlocal nb
            c, mb = unit(nb, False)
            row.append((Kind.BW, placement[r][c], mb))
            nb += 1

        for _ in range(warm):
            fwd()
        for _ in range(total - warm):
            fwd()
            bwd()
        while nb < total:
            bwd()
        ranks.append(row)
    return _sched(f"interleaved-v{v}", p, m, placement, ranks)


def greedy(name: str, p: int, m: int, placement: list[list[int]], cap: float, *, split: bool = True,
           costs: Costs | None = None, prio=None, first_cap: float | None = None) -> Schedule:
    """Memory-capped greedy list scheduling in simulated time.

    A free rank runs, in priority: a ready backward (B or BW); else a ready forward if its stash fits
    under ``cap`` (M_B; a non-last chunk must leave room for one later-chunk stash so the V can
    turn); else a pending W. Later stages first among forwards, earlier microbatches first.
    ``prio(kind, stage, mb, n_stages)`` replaces that order (smaller first; tests use random ones);
    ``first_cap`` additionally caps the first chunk's stashes. Always valid and deadlock-free by
    construction (it runs in simulated time); raises DeadlockError if ``cap`` is too small.
    """
    costs = costs or Costs()
    prio = prio or _default_prio
    v = len(placement[0])
    n_stages = p * v
    share = 1.0 / v
    owner = {s: (r, c) for r, stages in enumerate(placement) for c, s in enumerate(stages)}
    end: dict[tuple[Kind, int, int], float] = {}
    nxt = {(k, s): 0 for s in range(n_stages) for k in (Kind.F, Kind.B, Kind.W)}
    t = [0.0] * p
    mem = [0.0] * p
    held0 = [0.0] * p
    rows: list[list[tuple[Kind, int, int]]] = [[] for _ in range(p)]
    remaining = [v * m * (3 if split else 2) for _ in range(p)]
    back = Kind.B if split else Kind.BW

    def ready_at(kind: Kind, s: int, mb: int) -> float | None:
        deps = []
        if kind is Kind.F and s > 0:
            deps.append((Kind.F, s - 1, mb))
        if kind is back:
            deps.append((Kind.F, s, mb))
            if s < n_stages - 1:
                deps.append((back, s + 1, mb))
        if kind is Kind.W:
            deps.append((Kind.B, s, mb))
        times = [end.get(d) for d in deps]
        if any(x is None for x in times):
            return None
        return max(times, default=0.0) + (costs.comm if kind is not Kind.W else 0.0)

    blocked: set[int] = set()
    while any(remaining):
        r = min((rr for rr in range(p) if remaining[rr]), key=lambda rr: (t[rr], rr in blocked))
        cands: list[tuple[tuple, Kind, int, int]] = []
        future: list[float] = []
        for c, s in enumerate(placement[r]):
            for kind in (Kind.F, back, Kind.W) if split else (Kind.F, back):
                key = Kind.B if kind is Kind.BW else kind
                mb = nxt[(key, s)]
                if mb >= m:
                    continue
                at = ready_at(kind, s, mb)
                if at is None:
                    continue
                if at > t[r]:
                    future.append(at)
                    continue
                if kind is Kind.F:
                    room = share * (2 if c < v - 1 else 1)
                    if mem[r] + room > cap + 1e-9:
                        continue
                    if first_cap is not None and c == 0 and held0[r] + share > first_cap + 1e-9:
                        continue
                    cands.append((prio(kind, s, mb, n_stages), kind, s, mb))
                elif kind is Kind.W:
                    cands.append((prio(kind, s, mb, n_stages), kind, s, mb))
                else:
                    cands.append((prio(kind, s, mb, n_stages), kind, s, mb))
        if not cands:
            if r not in blocked:
                blocked.add(r)  # let the other ranks at this time move first
                continue
            later = [x for x in future + [t[rr] for rr in range(p)] if x > t[r]]
            if not later:
                raise DeadlockError(f"{name}: greedy stuck on rank {r} at t={t[r]} with cap={cap} M_B (raise the cap)")
            t[r] = min(later)
            blocked.discard(r)
            continue
        blocked.clear()
        _, kind, s, mb = min(cands)
        dur = costs.of(kind) * share
        end[(kind, s, mb)] = t[r] + dur
        t[r] += dur
        nxt[(Kind.B if kind is Kind.BW else kind, s)] += 1
        delta = share if kind is Kind.F else (-share if kind in (Kind.W, Kind.BW) else 0.0)
        mem[r] += delta
        if owner[s][1] == 0:
            held0[r] += delta
        rows[r].append((kind, s, mb))
        remaining[r] -= 1
    return _sched(name, p, m, placement, rows)


def _default_prio(kind, s, mb, n):
    return {Kind.F: (1, -s, mb), Kind.W: (2, mb, -s)}.get(kind, (0, mb, -s))


def zb_h1(p: int, m: int) -> Schedule:
    """ZB-H1: 1F1B's warm-up, B/W split, rank r defers its first r W's to the tail, so every rank
    holds at most p stashes and rank 0 only idles in warm-up: bubble (p-1)/(3m+p-1) for m >= p."""
    ranks = []
    for r in range(p):
        warm = min(p - r, m)
        row = [(Kind.F, r, i) for i in range(warm)]
        done_w = 0
        for k in range(m):
            row.append((Kind.B, r, k))
            if k >= r:
                row.append((Kind.W, r, done_w))
                done_w += 1
            if k + warm < m:
                row.append((Kind.F, r, k + warm))
        row += [(Kind.W, r, i) for i in range(done_w, m)]
        ranks.append(row)
    return _sched("zb-h1", p, m, loop_placement(p, 1), ranks)


def zb_h2(p: int, m: int) -> Schedule:
    return greedy("zb-h2", p, m, loop_placement(p, 1), cap=float(2 * p))


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", the V-shape schedule): V placement,
    B/W split, peak p M_B per rank, zero bubble for F = B = W and m >= 2p - 1, by construction.

    The construction needs at least 2p - 1 microbatches; below that it is built for 2p - 1 and
    the extra microbatches are dropped (that leaves bubbles), and the memory-capped greedy is
    used instead where it finishes sooner.
    """
    n = max(m, 2 * p - 1)
    rows = [[a for a in _zb_v_rank(p, n, r) if a[2] < m] for r in range(p)]
    built = _sched("zb-v", p, m, v_placement(p), rows)
    if n == m:
        return built
    other = greedy("zb-v", p, m, v_placement(p), cap=float(p))
    return min((built, other), key=lambda s: simulate(s).makespan)


def _zb_v_rank(p: int, n: int, r: int) -> list[tuple[Kind, int, int]]:
    """Rank r's ZB-V order for n >= 2p - 1 microbatches. Chunk 0 is stage r (down the V's first
    leg), chunk 1 is stage 2p-1-r (the second leg). Warm-up fills the V from both ends (more
    chunk-0 forwards the nearer the rank is to the start); the steady state alternates one F, B, W
    per chunk; cool-down defers the W's of the last microbatches into the V's drain."""
    stage = (r, 2 * p - 1 - r)
    row: list[tuple[Kind, int, int]] = []
    nxt = {(kind, c): 0 for kind in (Kind.F, Kind.B, Kind.W) for c in (0, 1)}

    def put(kind: Kind, chunk: int) -> None:
        row.append((kind, stage[chunk], nxt[(kind, chunk)]))
        nxt[(kind, chunk)] += 1

    for _ in range(2 * (p - r) - 1):  # warm-up 1: chunk-0 forwards until the V reaches back here
        put(Kind.F, 0)
    for _ in range(r):  # warm-up 2: interleave the second leg's forwards
        put(Kind.F, 1)
        put(Kind.F, 0)
    for _ in range(p - r):  # warm-up 3: the second leg turns into backward at once
        for kind in (Kind.F, Kind.B, Kind.W):
            put(kind, 1)
    while nxt[(Kind.F, 1)] < nxt[(Kind.F, 0)] or nxt[(Kind.F, 0)] < n:  # steady state
        if nxt[(Kind.F, 0)] < n:
            put(Kind.F, 0)
        put(Kind.B, 0)
        put(Kind.W, 0)
        for kind in (Kind.F, Kind.B, Kind.W):
            put(kind, 1)
    for _ in range(r):  # cool-down 1: input gradients first, weights later
        put(Kind.B, 0)
        put(Kind.B, 1)
    for _ in range(p - r):  # cool-down 2
        put(Kind.B, 0)
        put(Kind.W, 0)
    while nxt[(Kind.W, 1)] < n:  # the deferred weight gradients fill the drain
        put(Kind.W, 1)
    while nxt[(Kind.W, 0)] < n:
        put(Kind.W, 0)
    return row
