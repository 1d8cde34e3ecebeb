"""Snapshots inside a job, driver side: :class:`SnapshotService`.

The controller starts the service (holders on every node, before any trainer), calls
:meth:`SnapshotService.poll` from its health loop (collects phase-one votes, commits, replaces
holders that died on live nodes, triggers lazy flushes), and before every (re)start asks it for
the in-memory restore candidates (:meth:`memory_candidates`) and the holder plan ranks need
(:meth:`rank_plan`, handed to ranks through Ray; nothing goes through files). Holder trouble is
reported (``checkpoint.holder_lost``, ``checkpoint.holder_replaced``) and never stops training.
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
from .holder_set import HolderSet, HolderStartError, restart_holder, start_holders
from .placement import node_loss_tolerance
from .recovery import SnapshotUnavailable, fetch_snapshot
from .restore import FLUSH_SUBDIR, Candidate

EventFn = Callable[..., Any]  # RunLog.event(name, **fields)


def _trainer_nodes() -> list[str]:
    """Live nodes that can host a trainer (CPUs or GPUs); a compute-less head node gets no holder."""
    return [n["NodeID"] for n in ray.nodes()
            if n["Alive"] and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


class SnapshotService:
    """Driver side: holders, the commit coordinator, the flush tier, the in-memory restore candidates."""

    def __init__(self, cfg: CheckpointConfig, *, world: int, run_dir: str | Path, checkpoint_dir: str | Path,
                 event: EventFn, replica_groups: list[list[int]] | None = None):
        """``replica_groups``: ranks holding identical state (data-parallel replicas); default: none."""
        self.cfg, self.world, self.groups = cfg, world, replica_groups
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_id = hashlib.sha1(f"{Path(run_dir).resolve()}:{time.time_ns()}".encode()).hexdigest()[:10]
        self._event = event
        self.holders: HolderSet | None = None
        self.coord: SnapshotCoordinator | None = None
        self.flush_store = FlushStore(self.checkpoint_dir / FLUSH_SUBDIR, keep=cfg.keep)
        self.flusher: SnapshotFlusher | None = None
        self._generation = 0
        self._reported_lost: set[int] = set()
        self.changed = False
        """True when the holder set changed since the ranks last got :meth:`rank_plan` (reset by the caller)."""

    def _emit(self, record: dict[str, Any]) -> None:
        record = dict(record)
        self._event(record.pop("event"), **record)

    def start(self) -> None:
        """One holder per live node, started and answering before any trainer exists."""
        t0 = time.perf_counter()
        nodes = _trainer_nodes()
        self.holders = start_holders(nodes, self.run_id, keep=self.cfg.keep, timeout_s=self._start_timeout(),
                                     max_bytes=self.cfg.holder_bytes)
        self.coord = SnapshotCoordinator(self.holders, self.world, self.cfg.ec.k, self.cfg.ec.m, self.cfg.keep,
                                         events=self._emit, timeout_s=self.cfg.holder_timeout_s, groups=self.groups)
        if self.cfg.flush_every:
            self.flusher = SnapshotFlusher(self.flush_store, self.cfg.flush_every * self.cfg.snapshot_every,
                                           self.world, self._fetch_rank, events=self._emit, pin=self._pin,
                                           ranks=self.savers())
        reclaimed = {k: v for k, v in self.holders.call("ping", timeout_s=self.cfg.holder_timeout_s).items()
                     if not isinstance(v, BaseException) and v["reclaimed_segments"]}
        self._event("checkpoint.holders_started", nodes=len(nodes), start_s=round(time.perf_counter() - t0, 3),
                    holders=self.holders.names,
                    **({"reclaimed_segments": sum(v["reclaimed_segments"] for v in reclaimed.values())}
                       if reclaimed else {}))

    def _start_timeout(self) -> float:
        return max(60.0, self.cfg.holder_timeout_s)

    def savers(self) -> list[int]:
        """The rank that stands for each replica group (the flush tier writes one snapshot per group)."""
        return [g[0] for g in self.groups] if self.groups else list(range(self.world))

    def _pin(self, step: int, on: bool) -> None:
        self.holders.call("pin", step, on, timeout_s=self.cfg.holder_timeout_s)

    def _fetch_rank(self, step: int, rank: int) -> FlushedRank:
        """One rank's snapshot for the flush tier (a replica's when its own was not stored)."""
        group = next((g for g in (self.groups or []) if rank in g), [rank])
        error: Exception | None = None
        for source in [rank] + [r for r in group if r != rank]:
            try:
                snap = fetch_snapshot(self.holders, step, source, timeout_s=self.cfg.holder_timeout_s)
                return FlushedRank(snap.layout, snap.meta, snap.buffer)
            except SnapshotUnavailable as e:
                error = e
        raise error

    def poll(self) -> int | None:
        """From the controller's health loop: commit what every group stored; mend holders; flush lazily."""
        try:
            step = self.coord.collect_votes()
            self._mend_holders()
        except (ray.exceptions.RayError, HolderStartError) as e:  # never take the health loop down
            self._event("checkpoint.poll_failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        if step is not None and self.flusher is not None:
            self.flusher.on_complete(step)
        return step

    def _mend_holders(self) -> None:
        """A holder that died on a live node is restarted there; lost nodes degrade redundancy."""
        live = set(_trainer_nodes()) if self.holders.dead else set()
        for i in sorted(self.holders.dead):
            node = self.holders.node_ids[i]
            if i not in self._reported_lost:
                self._reported_lost.add(i)
                alive = len(self.holders.alive())
                self._event("checkpoint.holder_lost", node=node, holder=self.holders.names[i], holders_left=alive,
                            node_alive=node in live,
                            node_loss_tolerance=node_loss_tolerance(alive, self.cfg.ec.k, self.cfg.ec.m) if alive else 0)
            if node not in live:
                continue
            self._generation += 1
            restart_holder(self.holders, i, self.run_id, self.cfg.keep, self._generation, self._start_timeout(),
                           max_bytes=self.cfg.holder_bytes)
            self._reported_lost.discard(i)
            self.changed = True
            self._event("checkpoint.holder_replaced", node=node, holder=self.holders.names[i])
        self._add_holders_for_new_nodes()

    def _add_holders_for_new_nodes(self) -> None:
        known = set(self.holders.node_ids)
        fresh = [n for n in _trainer_nodes() if n not in known]
        if not fresh:
            return
        more = start_holders(fresh, self.run_id, keep=self.cfg.keep, first_index=len(self.holders),
                             timeout_s=self._start_timeout(), max_bytes=self.cfg.holder_bytes)
        self.holders.extend(more)
        self.coord.tolerance = node_loss_tolerance(len(self.holders.alive()), self.cfg.ec.k, self.cfg.ec.m)
        self.changed = True
        self._event("checkpoint.holders_added", nodes=len(fresh))

    def settle(self) -> None:
        """Before a restore: let a running flush finish, so the flush tier's newest step is complete."""
        if self.flusher is not None:
            try:
                self.flusher.wait(timeout_s=self.cfg.holder_timeout_s * 4)
            except TimeoutError:
                self._event("checkpoint.flush_abandoned", reason="flush still running at restore")

    def memory_candidates(self) -> list[Candidate]:
        """Complete in-memory steps whose fragments verify on live holders, newest first."""
        self.coord.check_holders()
        plan = self.coord.plan_restore()
        self._mend_holders()
        if plan["source"] != "memory":
            return []
        return [Candidate("memory", c["step"], self.world, sources=c["sources"], usable=c["usable"])
                for c in plan["candidates"]]

    def rollback(self, step: int | None) -> None:
        """The ranks resumed from ``step``: holders drop every later snapshot."""
        self.coord.rollback(step)

    def rank_plan(self) -> dict[str, Any]:
        """What a rank needs to snapshot and read snapshots: holders, k, m, cadence, timeouts."""
        self.changed = False
        return {"holders": self.holders.to_plan(), "world": self.world, "snapshot_every": self.cfg.snapshot_every,
                "k": self.cfg.ec.k, "m": self.cfg.ec.m, "timeout_s": self.cfg.holder_timeout_s,
                "strict": self.cfg.snapshot_strict, "groups": self.groups or [[r] for r in range(self.world)]}

    def shutdown(self) -> None:
        if self.flusher is not None:
            try:
                self.flusher.wait(timeout_s=120)
            except TimeoutError:
                self._event("checkpoint.flush_abandoned", reason="flush still running at shutdown")
        if self.holders is not None:
            self.holders.close()
