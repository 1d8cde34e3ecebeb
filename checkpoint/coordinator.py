"""The driver-side commit coordinator: a step is usable only when every rank's fragments are stored.

Phase one happens in each rank's writer (fragments acknowledged → "prepared"). The driver feeds
those reports to :meth:`SnapshotCoordinator.on_prepared`; when all ranks prepared a step, the
coordinator records it complete (the commit point) and tells every live holder (phase two),
which lets holders free older snapshots. Recovery always picks the newest complete step whose
fragments survive on live holders; a torn (never-complete) step is never chosen.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import ray

from .holder import HolderSet
from .placement import assignment, node_loss_tolerance

EventSink = Callable[[dict[str, Any]], None]


class SnapshotCoordinator:
    def __init__(self, holders: HolderSet, world: int, k: int, m: int, keep: int,
                 events: EventSink | None = None, timeout_s: float = 30.0,
                 groups: list[list[int]] | None = None):
        self.holders, self.world, self.k, self.m, self.keep = holders, world, k, m, keep
        self.groups = groups if groups is not None else [[r] for r in range(world)]
        if sorted(r for g in self.groups for r in g) != list(range(world)):
            raise ValueError(f"groups={self.groups} must partition ranks 0..{world - 1}")
        self.timeout_s = timeout_s
        self._events = events or (lambda e: None)
        self._last: dict[int, int] = {}  # rank -> newest step it reported stored
        self._complete: list[int] = []
        self._lock = threading.Lock()
        self.tolerance = tolerance = node_loss_tolerance(len(holders), k, m)
        self._events({"event": "checkpoint.holders", "nodes": len(holders), "k": k, "m": m,
                      "node_loss_tolerance": tolerance})

    # ---- commit ------------------------------------------------------------------------------
    def on_prepared(self, rank: int, step: int) -> int | None:
        """Record that ``rank`` stored every snapshot up to ``step``; returns a newly committed step.

        Writers store snapshots in order and stop at their first failure, and all ranks snapshot
        the same steps, so the newest complete step is the minimum over ranks of their reports.
        """
        with self._lock:
            if step > self._last.get(rank, -1):
                self._last[rank] = step
        return self._maybe_commit()

    def _maybe_commit(self) -> int | None:
        with self._lock:
            per_group = [max((self._last[r] for r in g if r in self._last), default=None) for g in self.groups]
            if any(s is None for s in per_group):
                return None
            step = min(per_group)
            if self._complete and step <= self._complete[-1]:
                return None
            self._complete = (self._complete + [step])[-self.keep :]
        self._broadcast_commit(step)
        return step

    def collect_votes(self) -> int | None:
        """Read the phase-one votes that writers logged on the holders; commit what they complete."""
        alive = self.holders.alive()
        refs = [self.holders.handles[h].votes.remote() for h in alive]
        for h, ref in zip(alive, refs):
            try:  # short: this runs inside the controller's health loop
                votes = ray.get(ref, timeout=min(5.0, self.timeout_s))
            except ray.exceptions.RayError:
                continue  # a lost holder is found and reported by check_holders()
            with self._lock:
                for rank, step in votes.items():
                    if step > self._last.get(int(rank), -1):
                        self._last[int(rank)] = step
        return self._maybe_commit()

    def rollback(self, step: int | None) -> None:
        """The job resumes from ``step``: holders drop later snapshots, later votes are forgotten."""
        self.reset_to(step)
        refs = [self.holders.handles[h].rollback.remote(step) for h in self.holders.alive()]
        try:
            ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.RayError:
            self.check_holders()

    def _broadcast_commit(self, step: int) -> None:
        alive = self.holders.alive()
        refs = [self.holders.handles[h].commit.remote(step) for h in alive]
        for h, ref in zip(alive, refs):
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayError:
                # The commit decision stands (it is recorded here); the holder is gone or stuck.
                self.holders.dead.add(h)
                self._events({"event": "checkpoint.holder_lost", "node": self.holders.node_ids[h], "step": step})

    def reset_to(self, step: int | None) -> None:
        """After a restore to ``step``: forget half-prepared later steps (they will be redone)."""
        with self._lock:
            self._last = {} if step is None else {r: min(s, step) for r, s in self._last.items()}
            self._complete = [s for s in self._complete if step is not None and s <= step]

    def latest_complete(self) -> int | None:
        with self._lock:
            return self._complete[-1] if self._complete else None

    def complete_steps(self) -> list[int]:
        with self._lock:
            return list(self._complete)

    # ---- recovery planning ---------------------------------------------------------------------
    def check_holders(self) -> list[int]:
        newly = self.holders.check(timeout_s=min(5.0, self.timeout_s))
        for h in newly:
            self._events({"event": "checkpoint.holder_lost", "node": self.holders.node_ids[h]})
        return newly

    def inventory(self, verify_step: int | None = None) -> dict[int, dict[str, list[int]]]:
        """{holder index: {"step/rank": fragment indices}} over live holders (verified at ``verify_step``)."""
        alive = self.holders.alive()
        refs = [self.holders.handles[h].inventory.remote(verify_step) for h in alive]
        out = {}
        for h, ref in zip(alive, refs):
            try:
                inv = ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayError:
                self.holders.dead.add(h)
                continue
            out[h] = inv["fragments"]
            for step, rank, j in inv["corrupt"]:
                self._events({"event": "checkpoint.fragment_corrupt", "step": step, "rank": rank, "fragment": j,
                              "node": self.holders.node_ids[h]})
        return out

    def restorable_step(self) -> tuple[int, dict[int, int]] | None:
        """Newest complete step where every group has a rank with >= k checksum-verified fragments
        on live holders, and {rank: rank whose snapshot it restores} (itself when it can)."""
        self.check_holders()
        for step in reversed(self.complete_steps()):
            inv = self.inventory(verify_step=step)

            def ok(r: int) -> bool:
                return len(set().union(*(set(f.get(f"{step}/{r}", [])) for f in inv.values()))) >= self.k

            sources: dict[int, int] = {}
            for group in self.groups:
                usable = [r for r in group if ok(r)]
                if not usable:
                    break
                sources.update({r: (r if r in usable else usable[0]) for r in group})
            else:
                return step, sources
        return None

    def plan_restore(self) -> dict[str, Any]:
        """Decide where restoration comes from and emit the event that says so.

        Returns ``{"source": "memory", "step": s, "sources": {rank: source rank}}`` or
        ``{"source": "durable", "reason": ...}``.
        """
        t0 = time.perf_counter()
        self.collect_votes()  # steps every rank stored before the failure count as complete
        found = self.restorable_step()
        lost = [self.holders.node_ids[h] for h in sorted(self.holders.dead)]
        if found is not None:
            step, sources = found
            event = {"event": "checkpoint.restore_plan", "source": "memory", "step": step,
                     "sources": {str(r): s for r, s in sources.items()}, "lost_nodes": len(lost), "m": self.m}
        else:
            reason = (f"{len(lost)} of {len(self.holders)} snapshot nodes lost (ec k={self.k}, m={self.m} over "
                      f"{len(self.holders)} nodes tolerates {self.tolerance}); no complete in-memory snapshot survives"
                      if self._complete else "no complete in-memory snapshot yet")
            event = {"event": "checkpoint.fallback_durable", "source": "durable", "reason": reason,
                     "lost_nodes": len(lost)}
        event["plan_s"] = round(time.perf_counter() - t0, 4)
        self._events(event)
        return event

    def placement(self, home: int) -> dict[int, list[int]]:
        return assignment(home, self.holders.alive(), self.k, self.m)

    def describe(self) -> str:
        return json.dumps({"complete": self.complete_steps(), "dead": sorted(self.holders.dead)})
