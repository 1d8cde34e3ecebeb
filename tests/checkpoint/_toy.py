"""A toy trainer actor for checkpoint tests: deterministic state per (rank, step), real SnapshotWriter."""

from __future__ import annotations

import os
import sys
import time

import ray
import ray.cloudpickle
import torch

from trainmem.checkpoint import SnapshotWriter

# Test helpers are not importable on Ray workers: ship this module by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def state_at(rank: int, step: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 100_003 + step)
    return {
        "model.w": torch.randn(numel, generator=g),
        "optim.0.exp_avg": torch.randn(numel // 2 + 3, generator=g),
        "optim.0.step": torch.tensor(float(step)),
    }


@ray.remote(num_cpus=0, max_concurrency=4, max_restarts=0)
class ToyTrainer:
    def __init__(self, rank: int, holders, home: int, k: int, m: int, numel: int):
        self.rank, self.numel = rank, numel
        self.writer = SnapshotWriter(rank=rank, holders=holders, home=home, k=k, m=m, put_timeout_s=30)
        self.state = state_at(rank, -1, numel)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, start: int, steps: int) -> int | None:
        """Steps ``start..start+steps-1``: mutate state in place (like optimizer.step), snapshot each."""
        for step in range(start, start + steps):
            self.writer.wait()
            for name, t in state_at(self.rank, step, self.numel).items():
                self.state[name].copy_(t)
            self.writer.capture(step, self.state, {"step": step})
        return self.writer.flush(timeout_s=60)

    def prepared(self) -> int | None:
        return self.writer.prepared_step


def poll_prepared(coord) -> None:
    """What the controller does each health poll: read the votes writers logged on the holders, commit."""
    coord.collect_votes()


def wait_dead(handle, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.pid.remote(), timeout=2)
        except ray.exceptions.RayError:
            return
        time.sleep(0.2)
    raise TimeoutError("actor still alive")
