"""Snapshots inside a job: the driver's :class:`SnapshotService` and each rank's :class:`RankSnapshots`.

The controller starts the service (holders on every node, before any trainer), calls
:meth:`SnapshotService.poll` from its health loop (collects phase-one votes, commits, triggers
lazy flushes) and :meth:`SnapshotService.prepare_attempt` before every (re)start. That call
decides where state comes from — memory, the flush tier or the durable tier — emits the event
naming it, and writes ``<checkpoint dir>/snapshot-plan.json`` (atomically) for the ranks. Each
rank opens :class:`RankSnapshots` from that plan, restores, and snapshots as it trains.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import ray

from .capture import SnapshotWriter
from .config import CheckpointConfig
from .coordinator import SnapshotCoordinator
from .durable import DurableStore, LoadedCheckpoint, atomic_write_text
from .flush import FlushedRank, FlushStore, SnapshotFlusher
from .holder import HolderSet, start_holders
from .placement import node_loss_tolerance
from .layout import restore_rng_states, unpack
from .recovery import SnapshotUnavailable, fetch_snapshot, reencode
from .reshard import dp_source_rank
from .state import flatten_training_state, restore_training_state

PLAN_FILE = "snapshot-plan.json"
EventFn = Callable[..., Any]  # RunLog.event(name, **fields)


def _trainer_nodes() -> list[str]:
    """Live nodes that can host a trainer (CPUs or GPUs); a compute-less head node gets no holder."""
    return [n["NodeID"] for n in ray.nodes()
            if n["Alive"] and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


class SnapshotService:
    """Driver side: holders, the commit coordinator, the flush tier, the restore decision."""

    def __init__(self, cfg: CheckpointConfig, *, world: int, run_dir: str | Path, checkpoint_dir: str | Path,
                 event: EventFn, replica_groups: list[list[int]] | None = None):
        """``replica_groups``: ranks holding identical state (data-parallel replicas); default: none."""
        self.cfg, self.world, self.groups = cfg, world, replica_groups
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_id = hashlib.sha1(f"{Path(run_dir).resolve()}:{time.time_ns()}".encode()).hexdigest()[:10]
        self._event = event
        self.holders: HolderSet | None = None
        self.coord: SnapshotCoordinator | None = None
        self.flush_store = FlushStore(self.checkpoint_dir / "snapshots", keep=cfg.keep)
        self.flusher: SnapshotFlusher | None = None

    def _emit(self, record: dict[str, Any]) -> None:
        record = dict(record)
        self._event(record.pop("event"), **record)

    def start(self) -> None:
        """One holder per live node, started and answering before any trainer exists."""
        t0 = time.perf_counter()
        nodes = _trainer_nodes()
        self.holders = start_holders(nodes, self.run_id, keep=self.cfg.keep, timeout_s=max(60.0, self.cfg.holder_timeout_s))
        self.coord = SnapshotCoordinator(self.holders, self.world, self.cfg.ec.k, self.cfg.ec.m, self.cfg.keep,
                                         events=self._emit, timeout_s=self.cfg.holder_timeout_s, groups=self.groups)
        if self.cfg.flush_every:
            self.flusher = SnapshotFlusher(self.flush_store, self.cfg.flush_every * self.cfg.snapshot_every,
                                           self.world, self._fetch_rank, events=self._emit, pin=self._pin)
        self._event("checkpoint.holders_started", nodes=len(nodes), start_s=round(time.perf_counter() - t0, 3),
                    holders=self.holders.names)

    def _pin(self, step: int, on: bool) -> None:
        refs = [self.holders.handles[h].pin.remote(step, on) for h in self.holders.alive()]
        ray.get(refs, timeout=self.cfg.holder_timeout_s)

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
        """From the controller's health loop: commit what every rank stored; flush lazily."""
        try:
            step = self.coord.collect_votes()
        except ray.exceptions.RayError as e:  # never take the health loop down; the next poll retries
            self._event("checkpoint.poll_failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        if step is not None and self.flusher is not None:
            self.flusher.on_complete(step)
        return step

    def _add_holders_for_new_nodes(self) -> None:
        known = set(self.holders.node_ids)
        fresh = [n for n in _trainer_nodes() if n not in known]
        if not fresh:
            return
        more = start_holders(fresh, self.run_id, keep=self.cfg.keep, first_index=len(self.holders),
                             timeout_s=max(60.0, self.cfg.holder_timeout_s))
        self.holders.node_ids += more.node_ids
        self.holders.handles += more.handles
        self.holders.prefixes += more.prefixes
        self.holders.names += more.names
        self.coord.tolerance = node_loss_tolerance(len(self.holders), self.cfg.ec.k, self.cfg.ec.m)
        self._event("checkpoint.holders_added", nodes=len(fresh))

    def _disk_latest(self) -> int | None:
        """Newest durable step every rank has: the shared store, or per-rank stores (pipelines)."""
        per_rank = sorted(self.checkpoint_dir.glob("rank-*"))
        if per_rank:
            steps = [DurableStore(p).latest_step() for p in per_rank]
            return None if any(s is None for s in steps) else min(steps)
        return DurableStore(self.checkpoint_dir).latest_step()

    def _durable_choice(self) -> dict[str, Any]:
        disk, flushed = self._disk_latest(), self.flush_store.latest_step()
        if flushed is not None and (disk is None or flushed >= disk):
            return {"source": "flush", "step": flushed, "world": self.flush_store.load_manifest_world(flushed)}
        if disk is not None:
            return {"source": "disk", "step": disk}
        return {"source": "none", "step": 0}

    def prepare_attempt(self, attempt: int) -> dict[str, Any]:
        """Decide where the ranks of this attempt restore from; write the plan; return its decision.

        ``{"source": "memory"|"flush"|"disk"|"none", "step": s, ...}``; with "disk" the ranks
        use the durable store themselves.
        """
        if attempt == 0:
            restore = self._durable_choice()  # a fresh launch or --resume: disk tiers only
        else:
            if self.flusher is not None:
                self.flusher.wait(timeout_s=self.cfg.holder_timeout_s * 4)
            self.coord.check_holders()
            plan = self.coord.plan_restore()
            if plan["source"] == "memory":
                restore = {"source": "memory", "step": plan["step"], "world": self.world, "sources": plan["sources"]}
            else:
                restore = self._durable_choice()
                self._event("checkpoint.durable_tier", tier=restore["source"], step=restore["step"],
                            reason=plan["reason"])
            self._add_holders_for_new_nodes()
        self.coord.rollback(restore["step"] if restore["source"] != "none" else None)
        plan_doc = {
            "format": "trainmem-snapshot-plan-v1", "attempt": attempt, "world": self.world,
            "snapshot_every": self.cfg.snapshot_every, "k": self.cfg.ec.k, "m": self.cfg.ec.m,
            "timeout_s": self.cfg.holder_timeout_s, "holders": self.holders.names,
            "node_ids": self.holders.node_ids, "dead": sorted(self.holders.dead), "restore": restore,
            "flush_dir": str(self.flush_store.root),
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.checkpoint_dir / PLAN_FILE, json.dumps(plan_doc, sort_keys=True))
        return restore

    def shutdown(self) -> None:
        if self.flusher is not None:
            try:
                self.flusher.wait(timeout_s=120)
            except TimeoutError:
                self._event("checkpoint.flush_abandoned", reason="flush still running at shutdown")
        if self.holders is not None:
            self.holders.close()


class RankSnapshots:
    """Rank side: restore as the plan says, then snapshot every ``snapshot_every`` steps."""

    def __init__(self, plan: dict[str, Any], rank: int, world: int):
        self.plan, self.rank, self.world = plan, rank, world
        dead = set(plan["dead"])
        handles = []
        for i, name in enumerate(plan["holders"]):
            try:
                handles.append(None if i in dead else ray.get_actor(name))
            except ValueError:
                handles.append(None)
                dead.add(i)
        self.holders = HolderSet(list(plan["node_ids"]), handles, list(plan["holders"]), dead, list(plan["holders"]))
        alive = self.holders.alive()
        mine = self.holders.index_of_node(ray.get_runtime_context().get_node_id())
        self.home = mine if mine in alive else alive[rank % len(alive)]
        self.every = plan["snapshot_every"]
        self.tier = "none"
        self.writer = SnapshotWriter(rank=rank, holders=self.holders, home=self.home, k=plan["k"], m=plan["m"],
                                     put_timeout_s=plan["timeout_s"])

    @staticmethod
    def open(checkpoint_dir: str | Path, rank: int, world: int) -> "RankSnapshots | None":
        path = Path(checkpoint_dir) / PLAN_FILE
        if not path.exists():
            return None
        return RankSnapshots(json.loads(path.read_text()), rank, world)

    def load(self) -> LoadedCheckpoint | None:
        """The planned state as ``LoadedCheckpoint`` (tensors + optimizer meta) from memory or the
        flush tier; None when the plan says the durable store (the rank reads it itself) or nothing."""
        r = self.plan["restore"]
        src = dp_source_rank(self.rank, r.get("world") or self.world)
        src = int(r.get("sources", {}).get(str(src), src))  # a replica's snapshot when its own is missing
        if r["source"] == "memory":
            snap = fetch_snapshot(self.holders, r["step"], src, home=self.home, timeout_s=self.plan["timeout_s"])
            if (snap.decoded or snap.corrupt) and src == self.rank:
                reencode(self.holders, snap, self.home, timeout_s=self.plan["timeout_s"])
            layout, meta, buffer = snap.layout, snap.meta, snap.buffer
        elif r["source"] == "flush":
            flushed = FlushStore(self.plan["flush_dir"]).load(r["step"], ranks=[src]).ranks[src]
            layout, meta, buffer = flushed.layout, flushed.meta, flushed.buffer
        else:
            return None
        restore_rng_states(meta["rng"])
        self.tier = r["source"]
        return LoadedCheckpoint(step=r["step"], tensors=unpack(buffer, layout, copy=False), meta=meta["user"]["optim"])

    def restore(self, model, optimizer) -> int | None:
        """:meth:`load` applied to ``model``/``optimizer``; returns the step, or None (use disk)."""
        loaded = self.load()
        if loaded is None:
            return None
        restore_training_state(model, optimizer, loaded.tensors, loaded.meta)
        return loaded.step

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def wait(self) -> float:
        """Before the optimizer step: the previous snapshot's copy must be finished."""
        return self.writer.wait()

    def capture(self, step: int, model, optimizer, meta: dict[str, Any] | None = None) -> float:
        tensors, optim_meta = flatten_training_state(model, optimizer)
        return self.writer.capture(step, tensors, {"optim": optim_meta, "world": self.world, **(meta or {})})

    def close(self) -> None:
        self.writer.close()
