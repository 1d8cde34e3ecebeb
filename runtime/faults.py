"""Real faults for `trainmem chaos`: what each kind does to a running job, and a plan drawn from a seed.

Every fault acts from outside the job, the way the world does: signals to processes (SIGKILL,
SIGSTOP for a hang), a Ray node removed, bytes flipped in a snapshot fragment in /dev/shm, a
durable file truncated, SIGTERM to the driver. Nothing in the job is told in advance.
"""

from __future__ import annotations

import glob
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any

import ray

KINDS = ("trainer_kill", "holder_kill", "hang", "node_remove", "fragment_flip", "durable_truncate",
         "driver_sigterm", "multi")
"""Fault kinds a trial can draw; ``multi`` is two or three of the in-process kinds in one run."""
_COMBINABLE = ("trainer_kill", "holder_kill", "hang", "fragment_flip")


@dataclass
class Fault:
    kind: str
    step: int
    """Injected once the job has finished this step."""
    rank: int = 0
    """The trainer (or, for holder_kill, the holder index modulo their number) it hits."""
    fired_at: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialPlan:
    seed: int
    kind: str
    faults: list[Fault]

    @property
    def kinds(self) -> list[str]:
        return [f.kind for f in self.faults]


def draw_plan(seed: int, kinds: list[str], steps: int, world: int) -> TrialPlan:
    """A trial's faults, a pure function of its ``seed`` (and the kinds allowed).

    Trial seeds are ``run_seed * 1000 + i``: trial i takes kind i of a shuffle of ``kinds`` drawn from
    the run seed, so N trials cover min(N, len(kinds)) kinds; steps and ranks come from the trial seed.
    """
    order = sorted(kinds)
    random.Random(seed // 1000).shuffle(order)
    kind = order[(seed % 1000) % len(order)]
    rng = random.Random(seed)
    lo, hi = 4, max(5, steps - 10)
    if kind == "multi":
        n = rng.choice((2, 3))
        picks = [rng.choice(_COMBINABLE) for _ in range(n)]
        at = sorted(rng.sample(range(lo, hi + 1, 4), min(n, len(range(lo, hi + 1, 4)))))
        faults = [Fault(k, s, rng.randrange(world)) for k, s in zip(picks, at)]
    else:
        faults = [Fault(kind, rng.randint(lo, hi), rng.randrange(world))]
    return TrialPlan(seed, kind, faults)


# ---- acting on a running job (the controller runs in this process) ------------------------------
def _pid(actor) -> int:
    return ray.get(actor.pid.remote(), timeout=10)


def kill_trainer(controller, fault: Fault) -> None:
    pid = _pid(controller.group.actors[fault.rank])
    fault.detail["pid"] = pid
    os.kill(pid, signal.SIGKILL)


def hang_trainer(controller, fault: Fault) -> None:
    """SIGSTOP: the process lives but makes no progress, as a rank stuck in a driver or a deadlock."""
    pid = _pid(controller.group.actors[fault.rank])
    fault.detail["pid"] = pid
    os.kill(pid, signal.SIGSTOP)


def kill_holder(controller, fault: Fault) -> None:
    holders = controller.snapshots.holders
    alive = holders.alive()
    h = alive[fault.rank % len(alive)]
    pid = ray.get(holders.handles[h].ping.remote(), timeout=10)["pid"]
    fault.detail.update(holder=holders.names[h], pid=pid)
    os.kill(pid, signal.SIGKILL)


def remove_trainer_node(controller, fault: Fault, cluster) -> None:
    """Remove the Ray node a trainer runs on: every process there dies (the caller adds a fresh node)."""
    node_id = ray.get(controller.group.actors[fault.rank].node_id.remote(), timeout=10)
    node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
    fault.detail["node"] = node_id
    cluster.remove_node(node)


def flip_fragment(controller, fault: Fault) -> None:
    """Flip bytes in one stored fragment of the newest committed snapshot, then kill a trainer so the
    restore has to read through (or decode around) the corruption."""
    step = controller.snapshots.coord.latest_complete()
    prefixes = [p for i, p in enumerate(controller.snapshots.holders.prefixes)
                if i not in controller.snapshots.holders.dead]
    paths = sorted(p for prefix in prefixes for p in glob.glob(f"/dev/shm/{prefix}-s{step}-r*-f*")
                   if not p.endswith(".tmp"))
    if paths:
        path = paths[fault.rank % len(paths)]
        with open(path, "r+b") as f:
            f.seek(max(0, os.path.getsize(path) // 2))
            b = f.read(16)
            f.seek(max(0, os.path.getsize(path) // 2))
            f.write(bytes(x ^ 0xA5 for x in b))
        fault.detail.update(fragment=os.path.basename(path), step=step)
    kill_trainer(controller, fault)


def truncate_durable(controller, fault: Fault) -> None:
    """Truncate the newest durable checkpoint's tensor file, then kill a trainer: the restore must
    reject it (checksum) and walk back to an older step."""
    from trainmem.checkpoint import DurableStore

    store = DurableStore(controller.location)
    steps = store.steps()
    if steps:
        folder = store.location.child(store.step_name(steps[-1]))
        name = next(iter(store.read_manifest(steps[-1])["files"]))
        data = folder.read_bytes(name)
        folder.write_bytes(name, data[: len(data) // 2])  # a half-written object, on disk or on S3
        fault.detail.update(file=folder.describe(name), step=steps[-1])
    kill_trainer(controller, fault)


ACTIONS = {"trainer_kill": kill_trainer, "hang": hang_trainer, "holder_kill": kill_holder,
           "fragment_flip": flip_fragment, "durable_truncate": truncate_durable}
