"""Split a model into pipeline stages from measured per-layer costs, and predict the step time.

Layers come as ``LayerCost`` in forward order: the embedding, the blocks, the head. Stage 0 always
holds the embedding and the last stage the head; the blocks are cut into contiguous runs. The split
minimises the slowest stage's forward + backward time (the pipeline runs at its pace), and among
splits within ``time_slack`` of that, the largest stage's saved bytes (the stash every microbatch
in flight costs).
"""

from __future__ import annotations

from collections.abc import Sequence

from .costs import LayerCost
from .ir import Schedule
from .simulate import Costs, SimResult, StageCost, simulate


def _check(layers: Sequence[LayerCost], n_stages: int) -> None:
    if len(layers) < 2:
        raise ValueError(f"layer costs have {len(layers)} entries; need the embedding and the head at least")
    if n_stages < 1:
        raise ValueError(f"n_stages={n_stages} must be >= 1")


def _partition(layers: Sequence[LayerCost], n_stages: int, by_bytes: bool, time_cap: float | None) -> tuple[float, list[int]]:
    """Blocks per stage minimising the largest stage time (or, with ``by_bytes``, saved bytes),
    counting only splits whose every stage time stays within ``time_cap``."""
    embed, blocks, head = layers[0], list(layers[1:-1]), layers[-1]
    n = len(blocks)
    pre_t, pre_b = [0.0], [0.0]
    for c in blocks:
        pre_t.append(pre_t[-1] + c.forward_s + c.backward_s)
        pre_b.append(pre_b[-1] + c.saved_bytes)

    def stage(s: int, i: int, j: int) -> tuple[float, float]:
        t, b = pre_t[j] - pre_t[i], pre_b[j] - pre_b[i]
        for c, here in ((embed, s == 0), (head, s == n_stages - 1)):
            if here:
                t, b = t + c.forward_s + c.backward_s, b + c.saved_bytes
        return t, b

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(n + 1) if s < n_stages else (n,):
            for i in range(j + 1):
                if best[s - 1][i] == inf:
                    continue
                t, b = stage(s - 1, i, j)
                if time_cap is not None and t > time_cap:
                    continue
                val = max(best[s - 1][i], b if by_bytes else t)
                if val < best[s][j]:
                    best[s][j], cut[s][j] = val, i
    counts, j = [], n
    for s in range(n_stages, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    return best[n_stages][n], counts[::-1]


def balance_layers(layers: Sequence[LayerCost], n_stages: int, time_slack: float = 0.02) -> list[int]:
    """Blocks per stage (``n_stages`` entries summing to len(layers) - 2) for the measured costs."""
    _check(layers, n_stages)
    if time_slack < 0:
        raise ValueError(f"time_slack={time_slack} must be >= 0")
    slowest, _ = _partition(layers, n_stages, by_bytes=False, time_cap=None)
    _, leanest = _partition(layers, n_stages, by_bytes=True, time_cap=slowest * (1 + time_slack) + 1e-12)
    return leanest


def stage_costs(layers: Sequence[LayerCost], layers_per_stage: Sequence[int],
                copy_bytes_per_s: float | None = None) -> list[StageCost]:
    """Per-stage F, B, W times (and stash copy time) of one microbatch for a given split. Stage 0
    has no input gradient to compute, so its whole backward is W, as the executor runs it."""
    _check(layers, len(layers_per_stage))
    if sum(layers_per_stage) != len(layers) - 2 or min(layers_per_stage) < 0:
        raise ValueError(f"layers_per_stage={list(layers_per_stage)} must be non-negative and sum to "
                         f"the {len(layers) - 2} measured blocks")
    out, start = [], 1
    last = len(layers_per_stage) - 1
    for s, n in enumerate(layers_per_stage):
        mine = list(layers[start:start + n])
        start += n
        if s == 0:
            mine.insert(0, layers[0])
        if s == last:
            mine.append(layers[-1])
        f = sum(c.forward_s for c in mine)
        b = 0.0 if s == 0 else sum(c.b_s for c in mine)
        w = sum(c.backward_s for c in mine) - b
        nbytes = sum(c.saved_bytes for c in mine)
        copy = nbytes / copy_bytes_per_s if copy_bytes_per_s else 0.0
        out.append(StageCost(f=f, b=b, w=w, saved_bytes=nbytes, copy=copy))
    return out


def predict(schedule: Schedule, layers: Sequence[LayerCost], layers_per_stage: Sequence[int], *,
            comm_s: float = 0.0, copy_bytes_per_s: float | None = None) -> SimResult:
    """Simulate ``schedule`` with measured costs: ``makespan`` is the predicted step time in
    seconds and ``peak_mb`` the per-rank peak saved bytes."""
    per_stage = stage_costs(layers, layers_per_stage, copy_bytes_per_s)
    return simulate(schedule, Costs(comm=comm_s), mem_weights={s: c.saved_bytes for s, c in enumerate(per_stage)},
                    stage_costs=per_stage)
