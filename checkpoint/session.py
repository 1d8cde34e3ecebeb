"""Snapshots inside a job, driver side: :class:`SnapshotService`.

The controller starts the service (holders on every node, before any trainer), calls
:meth:`SnapshotService.poll` from its health loop, and before every (re)start asks it for the
in-memory restore candidates (:meth:`memory_candidates`) and the plan ranks need
(:meth:`rank_plan`, handed to ranks through Ray; nothing goes through files). Its jobs live apart:
the holders' lifecycle and scrub in :class:`~.keeper.HolderKeeper`, the commit in
:class:`~.coordinator.SnapshotCoordinator`, the lazy flush in :class:`~.flush.SnapshotFlusher`.

Data-parallel replicas hold the same state; with ``stripe_replicas`` each captures one stripe of
it (:func:`~.layout.stripes`), so a step commits when every stripe of every group is stored, and
a restore assembles the group's state from its stripes.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import ray

from .config import CheckpointConfig
from .coordinator import SnapshotCoordinator
from .flush import FlushedRank, FlushStore, SnapshotFlusher
from .holder_set import HolderStartError
from .keeper import HolderKeeper
from .recovery import SnapshotUnavailable, fetch_snapshot
from .restore import FLUSH_SUBDIR, Candidate

EventFn = Callable[..., Any]  # RunLog.event(name, **fields)


class SnapshotService:
    """Driver side: holders (keeper), the commit coordinator, the flush tier, the in-memory candidates."""

    def __init__(self, cfg: CheckpointConfig, *, world: int, run_dir: str | Path, checkpoint_dir: str | Path | None,
                 event: EventFn, replica_groups: list[list[int]] | None = None):
        """``replica_groups``: ranks holding identical state (data-parallel replicas); default: none.
        ``checkpoint_dir``: the local checkpoint folder (the flush tier's parent); None when checkpoints are on S3."""
        self.cfg, self.world = cfg, world
        self.groups = replica_groups or [[r] for r in range(world)]
        self.striped = cfg.stripe_replicas and any(len(g) > 1 for g in self.groups)
        run_id = hashlib.sha1(f"{Path(run_dir).resolve()}:{time.time_ns()}".encode()).hexdigest()[:10]
        self._event = event
        self.keeper = HolderKeeper(cfg, run_id, event)
        self.coord: SnapshotCoordinator | None = None
        self.flush_store = (FlushStore(Path(checkpoint_dir) / FLUSH_SUBDIR, keep=cfg.keep, min_ratio=cfg.flush_min_ratio)
                            if checkpoint_dir is not None else None)
        self.flusher: SnapshotFlusher | None = None

    @property
    def holders(self):
        return self.keeper.holders

    @property
    def changed(self) -> bool:
        return self.keeper.changed

    def _emit(self, record: dict[str, Any]) -> None:
        record = dict(record)
        self._event(record.pop("event"), **record)

    def start(self) -> None:
        """One holder per live node, started and answering before any trainer exists."""
        holders = self.keeper.start()
        # Striped: every rank's stripe is needed for a step; else one stored replica completes its group.
        commit_groups = [[r] for r in range(self.world)] if self.striped else self.groups
        self.coord = SnapshotCoordinator(holders, self.world, self.cfg.ec.k, self.cfg.ec.m, self.cfg.keep,
                                         events=self._emit, timeout_s=self.cfg.holder_timeout_s, groups=commit_groups)
        if self.cfg.flush_every:
            self.flusher = SnapshotFlusher(self.flush_store, self.cfg.flush_every * self.cfg.snapshot_every,
                                           self.world, self._fetch_rank, events=self._emit, pin=self._pin,
                                           ranks=self.flushed_ranks())

    def flushed_ranks(self) -> list[int]:
        """The ranks whose snapshots the flush tier writes: every stripe, or one replica per group."""
        return list(range(self.world)) if self.striped else [g[0] for g in self.groups]

    def _pin(self, step: int, on: bool) -> None:
        self.holders.call("pin", step, on, timeout_s=self.cfg.holder_timeout_s)

    def _fetch_rank(self, step: int, rank: int) -> FlushedRank:
        """One rank's snapshot for the flush tier (a replica's when its own was not stored and replicas are whole)."""
        group = next((g for g in self.groups if rank in g), [rank])
        others = [] if self.striped else [r for r in group if r != rank]
        error: Exception | None = None
        for source in [rank] + others:
            try:
                snap = fetch_snapshot(self.holders, step, source, timeout_s=self.cfg.holder_timeout_s)
                return FlushedRank(snap.layout, snap.meta, snap.buffer)
            except SnapshotUnavailable as e:
                error = e
        raise error

    def poll(self) -> int | None:
        """From the controller's health loop: commit what every group stored; mend holders; scrub; flush lazily."""
        try:
            step = self.coord.collect_votes()
            self.keeper.mend()
            self.coord.tolerance = self.keeper.tolerance()
            self.keeper.check_scrubs()
        except (ray.exceptions.RayError, HolderStartError) as e:  # never take the health loop down
            self._event("checkpoint.poll_failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        if step is not None and self.flusher is not None:
            self.flusher.on_complete(step)
        return step

    def settle(self) -> None:
        """Before a restore: let a running flush finish, so the flush tier's newest step is complete."""
        if self.flusher is not None:
            try:
                self.flusher.wait(timeout_s=self.cfg.holder_timeout_s * 4)
            except TimeoutError:
                self._event("checkpoint.flush_abandoned", reason="flush still running at restore")

    def missing_stripes(self, step: int, failed: list[int]) -> list[int]:
        """Ranks among ``failed`` whose stripe of ``step`` was never stored (a replica can store it from
        its own live state, which is the same). Empty unless replicas are striped."""
        if not self.striped:
            return []
        self.coord.collect_votes()
        voted = self.coord.voted(step)
        return [r for r in failed if r not in voted]

    def memory_candidates(self) -> list[Candidate]:
        """Complete in-memory steps whose fragments verify on live holders, newest first."""
        self.coord.check_holders()
        plan = self.coord.plan_restore()
        self.keeper.mend()
        if plan["source"] != "memory":
            return []
        return [Candidate("memory", c["step"], self.world, sources=c["sources"], usable=c["usable"])
                for c in plan["candidates"]]

    def rollback(self, step: int | None) -> None:
        """The ranks resumed from ``step``: holders drop every later snapshot."""
        self.coord.rollback(step)

    def rank_plan(self) -> dict[str, Any]:
        """What a rank needs to snapshot and read snapshots: holders, k, m, cadence, groups, timeouts."""
        self.keeper.changed = False
        return {"holders": self.holders.to_plan(), "world": self.world, "snapshot_every": self.cfg.snapshot_every,
                "k": self.cfg.ec.k, "m": self.cfg.ec.m, "timeout_s": self.cfg.holder_timeout_s,
                "strict": self.cfg.snapshot_strict, "groups": self.groups, "striped": self.striped}

    def shutdown(self) -> None:
        if self.flusher is not None:
            try:
                self.flusher.wait(timeout_s=120)
            except TimeoutError:
                self._event("checkpoint.flush_abandoned", reason="flush still running at shutdown")
        self.keeper.wait_repairs(30)
        self.keeper.close()
