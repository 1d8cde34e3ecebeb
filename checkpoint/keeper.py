"""The holders' keeper (driver side): start one per node, mend lost ones, and act on the scrub.

A holder that died on a live node is restarted there (``checkpoint.holder_replaced``); one whose
node is gone lowers redundancy (``checkpoint.holder_lost`` with the node-loss tolerance left);
nodes that join get a holder (``checkpoint.holders_added``). Corrupt fragments the holders' scrub
finds are reported (``checkpoint.fragment_corrupt``) and re-encoded from the good ones in a
background thread (``checkpoint.fragment_repaired``), while training goes on.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import ray

from .config import CheckpointConfig
from .holder_set import HolderSet, restart_holder, start_holders
from .placement import node_loss_tolerance
from .recovery import SnapshotUnavailable, fetch_snapshot, reencode


def trainer_nodes() -> list[str]:
    """Live nodes that can host a trainer (CPUs or GPUs); a compute-less head node gets no holder."""
    return [n["NodeID"] for n in ray.nodes()
            if n["Alive"] and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


class HolderKeeper:
    def __init__(self, cfg: CheckpointConfig, run_id: str, event: Callable[..., Any]):
        self.cfg, self.run_id, self._event = cfg, run_id, event
        self.holders: HolderSet | None = None
        self._generation = 0
        self._reported_lost: set[int] = set()
        self._last_scrub = time.monotonic()
        self._repairing: threading.Thread | None = None
        self.changed = False
        """True when the holder set changed since the ranks last got a plan (reset by whoever hands it out)."""

    def _start_timeout(self) -> float:
        return max(60.0, self.cfg.holder_timeout_s)

    def start(self) -> HolderSet:
        t0 = time.perf_counter()
        nodes = trainer_nodes()
        self.holders = start_holders(nodes, self.run_id, keep=self.cfg.keep, timeout_s=self._start_timeout(),
                                     max_bytes=self.cfg.holder_bytes)
        pings = self.holders.call("ping", timeout_s=self.cfg.holder_timeout_s)
        reclaimed = sum(v["reclaimed_segments"] for v in pings.values() if not isinstance(v, BaseException))
        self._start_scrubs(range(len(self.holders)))
        self._event("checkpoint.holders_started", nodes=len(nodes), start_s=round(time.perf_counter() - t0, 3),
                    holders=self.holders.names, **({"reclaimed_segments": reclaimed} if reclaimed else {}))
        return self.holders

    def _start_scrubs(self, indices) -> None:
        if self.cfg.scrub_every_s:
            self.holders.call("start_scrub", self.cfg.scrub_every_s, indices=list(indices),
                              timeout_s=self.cfg.holder_timeout_s)

    def mend(self) -> None:
        """A holder that died on a live node is restarted there; lost nodes degrade redundancy."""
        live = set(trainer_nodes()) if self.holders.dead else set()
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
            self._start_scrubs([i])
            self._reported_lost.discard(i)
            self.changed = True
            self._event("checkpoint.holder_replaced", node=node, holder=self.holders.names[i])
        self._add_holders_for_new_nodes()

    def _add_holders_for_new_nodes(self) -> None:
        known = set(self.holders.node_ids)
        fresh = [n for n in trainer_nodes() if n not in known]
        if not fresh:
            return
        first = len(self.holders)
        self.holders.extend(start_holders(fresh, self.run_id, keep=self.cfg.keep, first_index=first,
                                          timeout_s=self._start_timeout(), max_bytes=self.cfg.holder_bytes))
        self._start_scrubs(range(first, len(self.holders)))
        self.changed = True
        self._event("checkpoint.holders_added", nodes=len(fresh))

    def tolerance(self) -> int:
        alive = len(self.holders.alive())
        return node_loss_tolerance(alive, self.cfg.ec.k, self.cfg.ec.m) if alive else 0

    # ---- the scrub -------------------------------------------------------------------------------
    def check_scrubs(self) -> None:
        """Every scrub period: collect what the holders' scrubs found; re-encode it in the background."""
        if not self.cfg.scrub_every_s or time.monotonic() - self._last_scrub < self.cfg.scrub_every_s:
            return
        self._last_scrub = time.monotonic()
        bad: set[tuple[int, int]] = set()
        for h, report in self.holders.call("scrub_report", timeout_s=self.cfg.holder_timeout_s).items():
            if isinstance(report, BaseException):
                continue
            for step, rank, j in report["corrupt"]:
                self._event("checkpoint.fragment_corrupt", step=step, rank=rank, fragment=j,
                            node=self.holders.node_ids[h], found_by="scrub")
                bad.add((step, rank))
        if bad and (self._repairing is None or not self._repairing.is_alive()):
            self._repairing = threading.Thread(target=self._repair, args=(sorted(bad),), name="snapshot-repair",
                                               daemon=True)
            self._repairing.start()

    def _repair(self, bad: list[tuple[int, int]]) -> None:
        for step, rank in bad:
            try:
                home = self._home_of(step, rank)
                snap = fetch_snapshot(self.holders, step, rank, home=home, timeout_s=self.cfg.holder_timeout_s)
                reencode(self.holders, snap, home, timeout_s=self.cfg.holder_timeout_s)
                self._event("checkpoint.fragment_repaired", step=step, rank=rank, decoded=snap.decoded)
            except (SnapshotUnavailable, ray.exceptions.RayError, RuntimeError) as e:
                self._event("checkpoint.fragment_repair_failed", step=step, rank=rank,
                            error=f"{type(e).__name__}: {str(e)[:200]}")

    def _home_of(self, step: int, rank: int) -> int:
        """The holder keeping the most fragments of (step, rank): its home (it keeps every data fragment)."""
        counts = {h: len(inv["fragments"].get(f"{step}/{rank}", []))
                  for h, inv in self.holders.call("inventory", timeout_s=self.cfg.holder_timeout_s).items()
                  if not isinstance(inv, BaseException)}
        return max(counts, key=counts.get) if counts else self.holders.alive()[0]

    def wait_repairs(self, timeout_s: float) -> None:
        if self._repairing is not None:
            self._repairing.join(timeout_s)

    def close(self) -> None:
        if self.holders is not None:
            self.holders.close()
