"""``[memory] activations`` inside a pipeline: one :class:`ActivationPolicy` over the blocks of this
rank's stages, planned for the microbatches the rank's schedule holds at once.

A rank of a pipeline keeps up to ``k`` microbatches' saved activations alive together (1F1B's first
rank: p), where the unpipelined policy plans for one. The warm-up measures one microbatch's blocks;
the planner then meets ``budget / k`` per microbatch (less the stage inputs, which the executor
keeps on the device whatever the blocks do), so that k microbatches, each at most its predicted
peak, stay within the rank's budget (a fraction budget is of k times the measured
no-policy peak, the rank's peak without a policy). Offloaded blocks need a host region per
microbatch in flight: the host pool is allocated once, k carves of one microbatch's need, and
each (stage, microbatch) takes a carve at its forward and gives it back, rewound, after its
backward (W or BW) has let go of the graph.

Worker::

    pp = PipelinePolicy.plan(cfg, {stage: its_blocks, ...}, rank_actions, warmup_step)
    ex = PipelineExecutor(..., stash_hooks=pp)
    with pp.step():
        ex.step(microbatches)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch.nn as nn

from trainmem.offload import ActivationConfig, ActivationPolicy, CostModel, HostPool, PlanInfeasible, build_plan, plan_blocks

from .ir import Action, Kind


def in_flight(actions: Sequence[Action]) -> int:
    """Most (stage, microbatch) pairs one rank's ``actions`` hold between an F and its last W/BW."""
    last = {(a.stage, a.mb): i for i, a in enumerate(actions) if a.kind in (Kind.W, Kind.BW)}
    live = peak = 0
    for i, a in enumerate(actions):
        if a.kind is Kind.F:
            live += 1
            peak = max(peak, live)
        elif last.get((a.stage, a.mb)) == i:
            live -= 1
    return max(peak, 1)


class PipelinePolicy:
    """The policy of one pipeline rank and its per-microbatch host carves (see the module doc)."""

    def __init__(self, policy: ActivationPolicy, k: int, carve_bytes: int) -> None:
        self.policy, self.k = policy, k
        self.plan_ = policy.plan_
        self._free: list[HostPool] = []
        self._taken: dict[tuple[int, int], HostPool] = {}
        if policy.engine is not None:
            self._free = [policy.pool.carve(carve_bytes, what=f"microbatch carve {i}") for i in range(k)]

    @classmethod
    def plan(cls, cfg: ActivationConfig, stage_blocks: dict[int, Sequence[nn.Module]], actions: Sequence[Action],
             warmup: Callable[[], object], *, rank: int = 0) -> "PipelinePolicy":
        """Measure ``warmup`` (one microbatch through the model, forward and backward), plan this
        rank's blocks (``stage_blocks``: per stage it runs, its blocks in order) for its schedule
        ``actions``. Raises PlanInfeasible naming the rank."""
        order = sorted(s for s, b in stage_blocks.items() if b)
        blocks = [b for s in order for b in stage_blocks[s]]
        policy = ActivationPolicy(cfg, blocks)
        profiles, peak, step_s, bandwidth = policy.measure(warmup)
        policy.profiles = profiles
        # a stage's input (stage > 0) stays on the device until its backward (the executor keeps it
        # for the input gradient): offloading or recomputing the first block cannot free it
        first, resident = 0, 0
        for s in order:
            if s > 0:
                resident += profiles[first].input_bytes
            first += len(stage_blocks[s])
        k = in_flight(actions)
        cuda = any(p.is_cuda for b in blocks for p in b.parameters())
        cost = CostModel(bandwidth=bandwidth, cuda=cuda)
        pad = policy.padding_bytes(len(profiles))
        capacity = max(0, policy.host_capacity() // k - pad)
        budget = cfg.budget_bytes(k * peak)
        try:
            per_mb = None if budget is None else max(0, budget // k - resident)
            choices = plan_blocks(profiles, mode=cfg.activations, budget=per_mb,
                                  host_capacity=capacity, cost=cost, alpha=cfg.alpha, alpha_steps=cfg.alpha_steps)
        except PlanInfeasible as exc:
            raise PlanInfeasible(f"pipeline rank {rank} holds {k} microbatches at once: {exc}",
                                 exc.smallest_feasible * k) from None
        plan = build_plan(profiles, choices, mode=cfg.activations, budget=budget, no_policy_peak=k * peak,
                          cost=cost, host_capacity=k * capacity, baseline_step_s=step_s)
        per_mb_host = plan.host_bytes
        plan.predicted_peak = k * (plan.predicted_peak + resident)  # each of k microbatches at most its own
        plan.host_bytes *= k
        plan.notes.append(f"pipeline rank {rank}: planned for {k} microbatches in flight (budget / {k} each)")
        carve = per_mb_host + pad
        policy.install(plan, choices, host_pool_bytes=k * (carve + 4096))  # + each carve's alignment
        return cls(policy, k, carve)

    # ---- executor hooks -------------------------------------------------------------------------
    def begin_forward(self, stage: int, mb: int) -> None:
        """Before the forward of (stage, mb): its offloaded blocks go to a carve of their own."""
        if self.policy.engine is None:
            return
        if not self._free:
            raise RuntimeError(f"stage {stage} microbatch {mb}: all {self.k} host carves are in use (the schedule "
                               f"holds more microbatches at once than it was planned for)")
        pool = self._taken[(stage, mb)] = self._free.pop()
        self.policy.engine.use_pool(pool)

    def end_backward(self, stage: int, mb: int) -> None:
        """After the last backward of (stage, mb): its carve is rewound and free again."""
        pool = self._taken.pop((stage, mb), None)
        if pool is not None:
            self.policy.engine.release_pool(pool)
            self._free.append(pool)

    @contextmanager
    def step(self) -> Iterator["PipelinePolicy"]:
        if self._taken:
            raise RuntimeError(f"microbatches {sorted(self._taken)} of the previous step never finished their backward")
        with self.policy.step():
            yield self

    @property
    def last_stats(self) -> dict:
        return self.policy.last_stats


__all__ = ["PipelinePolicy", "in_flight"]
