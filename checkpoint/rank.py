"""Snapshots inside a job, rank side: :class:`RankSnapshots` writes this rank's and reads any rank's.

Built from the plan the driver's :class:`~trainmem.checkpoint.session.SnapshotService` hands out
(holders, k, m, cadence, replica groups). When the driver replaces or adds holders it hands out a
new plan and the rank switches to it (:meth:`update`) between two snapshots. With striped replicas
a rank captures only its stripe of the group's state; reading a group assembles every stripe.
"""

from __future__ import annotations

from typing import Any, Callable

import ray
import torch

from .capture import SnapshotWriter
from .holder_set import HolderSet
from .layout import stripes, unpack
from .recovery import fetch_snapshot, reencode
from .restore import Candidate, StateReader


class RankSnapshots:
    def __init__(self, plan: dict[str, Any], rank: int, world: int, on_event: Callable[..., None] | None = None):
        self.plan, self.rank, self.world = plan, rank, world
        self.every = plan["snapshot_every"]
        self.groups: list[list[int]] = plan["groups"]
        self.group = next((g for g in self.groups if rank in g), [rank])
        self.striped = bool(plan.get("striped")) and len(self.group) > 1
        self.holders = HolderSet.from_plan(plan["holders"])
        self.writer = SnapshotWriter(rank=rank, holders=self.holders, home=self._home(), k=plan["k"], m=plan["m"],
                                     put_timeout_s=plan["timeout_s"], on_event=on_event, strict=plan["strict"])

    def _home(self) -> int:
        """The holder on this rank's node when it takes fragments, else another by rank."""
        writable = self.holders.writable() or self.holders.alive()
        mine = self.holders.index_of_node(ray.get_runtime_context().get_node_id())
        return mine if mine in writable else writable[self.rank % len(writable)]

    def update(self, plan: dict[str, Any]) -> None:
        """The driver's holder set changed (a holder replaced, nodes added): use it from the next snapshot."""
        self.plan = plan
        self.holders = HolderSet.from_plan(plan["holders"])
        self.writer.set_holders(self.holders, self._home())

    # ---- writing -----------------------------------------------------------------------------
    def _stripe(self, tensors: dict[str, torch.Tensor], of_rank: int) -> dict[str, torch.Tensor]:
        if not self.striped:
            return tensors
        names = stripes(tensors, len(self.group))[self.group.index(of_rank)]
        return {n: tensors[n] for n in names}

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def wait(self) -> float:
        """Before the optimizer step: the previous snapshot's pass must be finished."""
        return self.writer.wait()

    def capture(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> float:
        return self.writer.capture(step, self._stripe(tensors, self.rank), self._meta(meta))

    def _meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Readers of any tier (memory, flush) learn from the snapshot itself whether to assemble stripes."""
        return {**meta, "group": self.group, "striped": self.striped}

    def repair(self, step: int, ranks: list[int], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Store the stripes of lost replicas ``ranks`` for ``step`` from this rank's live state (the same
        state: replicas), so the step their death left incomplete commits after all."""
        for r in ranks:
            self.writer.store_now(step, r, self._stripe(tensors, r), self._meta(meta))

    # ---- reading -----------------------------------------------------------------------------
    def reader(self, cand: Candidate) -> StateReader:
        """read(r): the state of old rank r's replica group at ``cand.step``, verified (and decoded if needed)."""
        timeout = self.plan["timeout_s"]

        def fetch(src: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            home = self._home()
            snap = fetch_snapshot(self.holders, cand.step, src, home=home, timeout_s=timeout)
            if (snap.decoded or snap.corrupt) and src == self.rank:
                reencode(self.holders, snap, home, timeout_s=timeout)  # full redundancy again
            return unpack(snap.buffer, snap.layout, copy=False), snap.meta["user"]["state"]

        def read(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            group = next((g for g in self.groups if rank in g), [rank])
            if self.plan.get("striped") and len(group) > 1:  # every stripe of the group, assembled
                tensors: dict[str, torch.Tensor] = {}
                meta: dict[str, Any] = {}
                for src in group:
                    part, meta = fetch(src)
                    tensors.update(part)
                return tensors, meta
            # Any usable replica of the group serves; this rank's own snapshot is on its home node.
            src = self.rank if self.rank in group and self.rank in cand.usable else int(cand.sources.get(str(rank), rank))
            return fetch(src)

        return read

    def close(self) -> None:
        self.writer.close()
