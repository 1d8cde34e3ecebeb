"""The worker's checkpointing: one callback protocol, two tiers that implement it, and the restore walk.

The step loop knows checkpointing only through :class:`CheckpointCallback` (as Ray Train's and
torchtitan's checkpointers are called by their trainers): ``before_optimizer_step`` (the last
snapshot's copy must be done before parameters change), ``after_optimizer_step`` (save or
snapshot) and ``close``. :class:`DurableCheckpoints` writes the durable tier, :class:`Snapshots`
the in-memory erasure-coded tier. Restoring walks the driver's candidates newest first
(:func:`walk_restore`) until every rank could read the same one.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from trainmem.checkpoint import (Candidate, CheckpointCorrupt, DurableStore, Location, RankSnapshots,
                                 SnapshotUnavailable, durable_reader, flush_reader)

from .engines import Engine, StateReader


class CheckpointCallback(Protocol):
    def before_optimizer_step(self) -> None: ...
    def after_optimizer_step(self, step: int, engine: Engine) -> None: ...
    def close(self) -> None: ...


class DurableCheckpoints:
    """Every ``every`` steps the first rank of each replica group saves its group's state."""

    def __init__(self, root: Location, *, every: int, keep: int, saves: bool, world: int, seed: int):
        self.store = DurableStore(root, keep=keep)
        self.every, self.saves, self.world, self.seed = every, saves, world, seed

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self, step: int, engine: Engine) -> None:
        if self.every and step % self.every == 0:
            self.save_now(step, engine)

    def save_now(self, step: int, engine: Engine) -> None:
        """Collective: the savers write ``step``; every rank waits until it is durable."""
        if self.saves:
            tensors, meta = engine.state_for_checkpoint()
            self.store.save(step, tensors, {"state": meta, "world": self.world, "seed": self.seed})
        dist.barrier()  # no rank runs ahead of a checkpoint that is not yet durable

    def close(self) -> None:
        pass


class Snapshots:
    """An in-memory snapshot every ``snapshot_every`` steps, captured off the loop (see checkpoint.capture)."""

    def __init__(self, ranks: RankSnapshots, *, world: int, seed: int):
        self.ranks, self.world, self.seed = ranks, world, seed

    def before_optimizer_step(self) -> None:
        self.ranks.wait()

    def after_optimizer_step(self, step: int, engine: Engine) -> None:
        if self.ranks.due(step):
            tensors, meta = engine.state_for_checkpoint()
            self.ranks.capture(step, tensors, snapshot_meta(meta, self.world, self.seed))

    def close(self) -> None:
        self.ranks.close()


def snapshot_meta(engine_meta: dict[str, Any], world: int, seed: int) -> dict[str, Any]:
    """What a snapshot records beside the tensors: the engine's own metadata, the world and the seed."""
    return {"state": engine_meta, "world": world, "seed": seed}


def open_reader(cand: Candidate, location: Location, snapshots: RankSnapshots | None) -> StateReader:
    if cand.tier == "durable":
        return durable_reader(location, cand)
    if cand.tier == "flush":
        return flush_reader(location, cand)
    if snapshots is None:
        raise SnapshotUnavailable(f"memory step {cand.step}: this job keeps no in-memory snapshots")
    return snapshots.reader(cand)


def walk_restore(engine: Engine, candidates: list[Candidate], reader_of: Callable[[Candidate], StateReader],
                 rank: int) -> dict[str, Any]:
    """Try candidates newest first; the first that every rank loads is the restore point.

    Returns ``{"step", "tier", "rejected": [{tier, step, rank, reason}]}``: step 0 is a fresh start
    (there were no candidates), step None means every candidate was rejected by some rank.
    """
    rejected: list[dict[str, Any]] = []
    for cand in candidates:
        reason = ""
        try:
            engine.load_checkpoint(reader_of(cand), cand.world)
        except (CheckpointCorrupt, SnapshotUnavailable, OSError, ValueError, KeyError) as e:
            reason = f"{type(e).__name__}: {e}"
        except Exception as e:  # a reader bug must not hang the others inside the agreement below
            reason = f"{type(e).__name__}: {e} ({traceback.format_exc(limit=3).splitlines()[-2].strip()})"
        ok = torch.tensor([0 if reason else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            return {"step": cand.step, "tier": cand.tier, "rejected": rejected}
        rejected.append({"tier": cand.tier, "step": cand.step, "rank": rank,
                         "reason": reason or "another rank could not read it"})
    return {"step": None if candidates else 0, "tier": "none", "rejected": rejected}
