"""The driver-side commit coordinator: a step is usable only when every replica group stored it.

Phase one happens in each rank's writer: when every fragment of (step, rank) is acknowledged it
logs a vote for that step on the holders. The driver reads the votes (:meth:`collect_votes`, from
its health loop, all holders at once under one short deadline) and commits the newest step that
every replica group voted for (the commit point), then tells every live holder (phase two), which
lets holders free older snapshots. Votes are per step, so a writer that skipped a snapshot (a
holder was lost, its slot was busy) never makes a step look complete that it did not store.
Recovery picks among complete steps whose fragments survive; a torn step is never chosen.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from .holder_set import HolderSet
from .placement import assignment, node_loss_tolerance

EventSink = Callable[[dict[str, Any]], None]


class SnapshotCoordinator:
    def __init__(self, holders: HolderSet, world: int, k: int, m: int, keep: int,
                 events: EventSink | None = None, timeout_s: float = 30.0,
                 groups: list[list[int]] | None = None, poll_timeout_s: float = 2.0):
        self.holders, self.world, self.k, self.m, self.keep = holders, world, k, m, keep
        self.groups = groups if groups is not None else [[r] for r in range(world)]
        if sorted(r for g in self.groups for r in g) != list(range(world)):
            raise ValueError(f"groups={self.groups} must partition ranks 0..{world - 1}")
        self.timeout_s = timeout_s
        self.poll_timeout_s = min(poll_timeout_s, timeout_s)
        self._events = events or (lambda e: None)
        self._voted: dict[int, set[int]] = {}  # rank -> steps it stored
        self._complete: list[int] = []
        self._uncommitted_on: dict[int, int] = {}  # holder -> newest step it has not acknowledged
        self._lock = threading.Lock()
        self.tolerance = node_loss_tolerance(len(holders), k, m)
        self._events({"event": "checkpoint.holders", "nodes": len(holders), "k": k, "m": m,
                      "node_loss_tolerance": self.tolerance})

    # ---- commit ------------------------------------------------------------------------------
    def on_prepared(self, rank: int, step: int) -> int | None:
        """Record that ``rank`` stored ``step``; returns a newly committed step, if any."""
        with self._lock:
            self._voted.setdefault(rank, set()).add(step)
        return self._maybe_commit()

    def _newest_complete_locked(self) -> int | None:
        per_group = [set().union(*(self._voted.get(r, set()) for r in g)) for g in self.groups]
        common = set.intersection(*per_group) if per_group else set()
        return max(common) if common else None

    def _maybe_commit(self) -> int | None:
        with self._lock:
            step = self._newest_complete_locked()
            if step is None or (self._complete and step <= self._complete[-1]):
                return None
            self._complete = (self._complete + [step])[-self.keep :]
            floor = self._complete[0]
            self._voted = {r: {s for s in v if s >= floor} for r, v in self._voted.items()}
        self._broadcast_commit(step)
        return step

    def collect_votes(self) -> int | None:
        """Read the phase-one votes that writers logged on the holders; commit what they complete.

        Runs inside the controller's health loop: one short deadline for all holders together;
        a holder that misses it is asked again next poll.
        """
        replies = self.holders.call("votes", timeout_s=self.poll_timeout_s)
        with self._lock:
            for votes in replies.values():
                if isinstance(votes, BaseException):
                    continue
                for rank, steps in votes.items():
                    self._voted.setdefault(int(rank), set()).update(steps)
        self._retry_commits()
        return self._maybe_commit()

    def _broadcast_commit(self, step: int) -> None:
        """Phase two to every live holder; one that misses the deadline is told again next poll."""
        with self._lock:
            complete = list(self._complete)
        replies = self.holders.call("commit", step, complete, timeout_s=self.poll_timeout_s)
        for h, reply in replies.items():
            if isinstance(reply, BaseException):
                self._uncommitted_on[h] = max(step, self._uncommitted_on.get(h, -1))
            else:
                self._uncommitted_on.pop(h, None)

    def _retry_commits(self) -> None:
        pending = {h: s for h, s in self._uncommitted_on.items() if h not in self.holders.dead}
        self._uncommitted_on = {}
        with self._lock:
            complete = list(self._complete)
        for step in sorted(set(pending.values())):
            replies = self.holders.call("commit", step, complete, indices=[h for h, s in pending.items() if s == step],
                                        timeout_s=self.poll_timeout_s)
            for h, reply in replies.items():
                if isinstance(reply, BaseException):
                    self._uncommitted_on[h] = step

    def rollback(self, step: int | None) -> None:
        """The job resumes from ``step``: holders drop later snapshots, later votes are forgotten.

        Both sides forget: votes a writer logged on a holder for a later step outlive the writer, and
        forgetting them here alone would let the next ``collect_votes`` count an earlier incarnation's
        vote towards a step the redo has not stored yet.
        """
        with self._lock:
            limit = -1 if step is None else step
            self._voted = {r: {s for s in v if s <= limit} for r, v in self._voted.items()}
            self._complete = [s for s in self._complete if s <= limit]
        self.holders.call("rollback", step, timeout_s=self.timeout_s)

    def voted(self, step: int) -> set[int]:
        """Ranks known to have stored ``step``."""
        with self._lock:
            return {r for r, steps in self._voted.items() if step in steps}

    def latest_complete(self) -> int | None:
        with self._lock:
            return self._complete[-1] if self._complete else None

    def complete_steps(self) -> list[int]:
        with self._lock:
            return list(self._complete)

    # ---- recovery planning ---------------------------------------------------------------------
    def check_holders(self) -> list[int]:
        """Ping the holders; returns the newly dead (the snapshot service reports and replaces them)."""
        return self.holders.check(timeout_s=min(5.0, self.timeout_s))

    def inventory(self, verify_step: int | None = None) -> dict[int, dict[str, list[int]]]:
        """{holder index: {"step/rank": fragment indices}} over live holders (verified at ``verify_step``)."""
        out = {}
        for h, inv in self.holders.call("inventory", verify_step, timeout_s=self.timeout_s).items():
            if isinstance(inv, BaseException):
                continue
            out[h] = inv["fragments"]
            for step, rank, j in inv["corrupt"]:
                self._events({"event": "checkpoint.fragment_corrupt", "step": step, "rank": rank, "fragment": j,
                              "node": self.holders.node_ids[h]})
        return out

    def restorable_steps(self) -> list[tuple[int, list[int], dict[int, int]]]:
        """Complete steps, newest first, where every group has a rank with >= k checksum-verified
        fragments on live holders: (step, usable ranks, {rank: rank whose snapshot it restores})."""
        self.check_holders()
        found = []
        for step in reversed(self.complete_steps()):
            inv = self.inventory(verify_step=step)

            def ok(r: int) -> bool:
                return len(set().union(*(set(f.get(f"{step}/{r}", [])) for f in inv.values()))) >= self.k

            usable = [r for r in range(self.world) if ok(r)]
            sources: dict[int, int] = {}
            for group in self.groups:
                mine = [r for r in group if r in usable]
                if not mine:
                    break
                sources.update({r: (r if r in mine else mine[0]) for r in group})
            else:
                found.append((step, usable, sources))
        return found

    def restorable_step(self) -> tuple[int, dict[int, int]] | None:
        """The newest of :meth:`restorable_steps` as (step, sources), or None."""
        found = self.restorable_steps()
        return (found[0][0], found[0][2]) if found else None

    def plan_restore(self) -> dict[str, Any]:
        """Decide whether memory can serve a restore and emit the event that says so.

        Returns ``{"source": "memory", "step": s, "sources": {rank: source rank}, "candidates": [...]}``
        or ``{"source": "durable", "reason": ...}``.
        """
        t0 = time.perf_counter()
        self.collect_votes()  # steps every rank stored before the failure count as complete
        found = self.restorable_steps()
        lost = [self.holders.node_ids[h] for h in sorted(self.holders.dead)]
        if found:
            step, usable, sources = found[0]
            event = {"event": "checkpoint.restore_plan", "source": "memory", "step": step,
                     "sources": {str(r): s for r, s in sources.items()}, "lost_nodes": len(lost), "m": self.m,
                     "candidates": [{"step": s, "usable": u, "sources": {str(r): x for r, x in src.items()}}
                                    for s, u, src in found]}
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
        return assignment(home, self.holders.writable(), self.k, self.m)

    def describe(self) -> str:
        return json.dumps({"complete": self.complete_steps(), "dead": sorted(self.holders.dead)})
