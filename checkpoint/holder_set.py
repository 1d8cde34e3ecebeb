"""The holders of a job: one per node, in a fixed order that fragment placement indexes into.

Each holder is ``ok``, ``suspect`` (did not answer within a deadline: no new fragments go to it,
but it is still read from and comes back as soon as it answers) or ``dead`` (its actor is gone).
Calls to many holders go out at once and share one deadline (:meth:`HolderSet.call`), so a slow
holder costs the caller that deadline once, not once per holder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .holder import SnapshotHolder
from .segments import cleanup_segments


class HolderTimeout(TimeoutError):
    """A holder did not answer within the deadline (it may be slow, not gone)."""


@dataclass
class HolderSet:
    node_ids: list[str]
    handles: list[Any]
    prefixes: list[str]
    dead: set[int] = field(default_factory=set)
    names: list[str] = field(default_factory=list)
    suspect: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.handles)

    def alive(self) -> list[int]:
        """Holders not known dead (suspects included: they may still hold fragments)."""
        return [i for i in range(len(self.handles)) if i not in self.dead]

    def writable(self) -> list[int]:
        """Holders new fragments are placed on: answering and alive."""
        return [i for i in self.alive() if i not in self.suspect]

    def index_of_node(self, node_id: str) -> int | None:
        try:
            return self.node_ids.index(node_id)
        except ValueError:
            return None

    def call(self, method: str, *args: Any, indices: list[int] | None = None,
             timeout_s: float = 5.0) -> dict[int, Any]:
        """Call ``method`` on many holders at once with one deadline; {index: result or exception}.

        A holder whose actor died is marked dead (and its segments freed when its node is this
        machine's); one that misses the deadline is marked suspect and gets a HolderTimeout; one
        that answers is no longer suspect.
        """
        indices = self.alive() if indices is None else [i for i in indices if i not in self.dead]
        return self.gather({i: getattr(self.handles[i], method).remote(*args) for i in indices}, method, timeout_s)

    def gather(self, refs: dict[int, Any], what: str, timeout_s: float) -> dict[int, Any]:
        """Wait for per-holder calls already issued (``{index: ref}``) under one deadline; as :meth:`call`."""
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        ready = set(ready)
        out: dict[int, Any] = {}
        for i, ref in refs.items():
            if ref not in ready:
                self.suspect.add(i)
                out[i] = HolderTimeout(f"holder {self.names[i] if self.names else i} on node {self.node_ids[i][:12]} "
                                       f"did not answer {what} within {timeout_s:g}s")
                continue
            try:
                out[i] = ray.get(ref)
                self.suspect.discard(i)
            except ray.exceptions.RayActorError as e:
                self.mark_dead(i)
                out[i] = e
            except ray.exceptions.RayError as e:
                self.suspect.discard(i)  # it answered, with an error of the call itself
                out[i] = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
        return out

    def mark_dead(self, i: int) -> None:
        if i not in self.dead:
            self.dead.add(i)
            self.suspect.discard(i)
            cleanup_segments(self.prefixes[i])  # simulated nodes share this machine's tmpfs

    def check(self, timeout_s: float = 5.0) -> list[int]:
        """Ping every holder believed alive; returns the newly dead."""
        before = set(self.dead)
        self.call("ping", timeout_s=timeout_s)
        return sorted(self.dead - before)

    def replace(self, i: int, handle: Any, prefix: str, name: str) -> None:
        """A fresh holder takes slot ``i`` (same node) after the old one died."""
        self.handles[i], self.prefixes[i] = handle, prefix
        if self.names:
            self.names[i] = name
        self.dead.discard(i)
        self.suspect.discard(i)

    def extend(self, other: "HolderSet") -> None:
        self.node_ids += other.node_ids
        self.handles += other.handles
        self.prefixes += other.prefixes
        self.names += other.names

    def to_plan(self) -> dict[str, Any]:
        """What a rank needs to find the holders (names, nodes, states), JSON-able."""
        return {"names": list(self.names), "node_ids": list(self.node_ids), "dead": sorted(self.dead),
                "suspect": sorted(self.suspect)}

    @staticmethod
    def from_plan(plan: dict[str, Any]) -> "HolderSet":
        dead = set(plan["dead"])
        handles = []
        for i, name in enumerate(plan["names"]):
            try:
                handles.append(None if i in dead else ray.get_actor(name))
            except ValueError:
                handles.append(None)
                dead.add(i)
        return HolderSet(list(plan["node_ids"]), handles, list(plan["names"]), dead, list(plan["names"]),
                         set(plan.get("suspect", [])) - dead)

    def close(self, timeout_s: float = 10.0) -> None:
        self.call("close", timeout_s=timeout_s)
        for i, prefix in enumerate(self.prefixes):
            cleanup_segments(prefix)
            try:
                ray.kill(self.handles[i])
            except Exception:  # already gone
                pass


def _start_one(node_id: str, prefix: str, keep: int, max_bytes: int):
    return ray.remote(SnapshotHolder).options(
        name=prefix, num_cpus=0, max_concurrency=8, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(prefix, keep, max_bytes)


def _wait_started(handles: list[Any], node_ids: list[str], timeout_s: float) -> None:
    refs = [h.ping.remote() for h in handles]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [node_ids[i][:12] for i, r in enumerate(refs) if r in set(pending)]
        raise HolderStartError(f"snapshot holders on node(s) {late} did not start within {timeout_s:g}s "
                               "(fix: check those nodes' Ray logs, or raise checkpoint.holder_timeout_s)")
    for i, ref in enumerate(refs):
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
            raise HolderStartError(f"snapshot holder on node {node_ids[i][:12]} failed to start: {cause}") from None
        if info["node_id"] != node_ids[i]:
            raise HolderStartError(f"snapshot holder {i} landed on node {info['node_id']}, asked for {node_ids[i]}")


class HolderStartError(RuntimeError):
    """Holders could not be started; the message names the nodes and the fix."""


def start_holders(node_ids: list[str], run_id: str, keep: int, timeout_s: float = 60.0,
                  first_index: int = 0, max_bytes: int = 0) -> HolderSet:
    """Start one holder per node (before any trainer) and wait until each answers.

    Holders are named actors ``tmck-<run_id>-n<i>`` (so ranks can look them up by name).
    """
    prefixes = [f"tmck-{run_id}-n{i}" for i in range(first_index, first_index + len(node_ids))]
    handles = [_start_one(n, p, keep, max_bytes) for n, p in zip(node_ids, prefixes)]
    _wait_started(handles, node_ids, timeout_s)
    return HolderSet(list(node_ids), handles, prefixes, names=list(prefixes))


def restart_holder(holders: HolderSet, i: int, run_id: str, keep: int, generation: int, timeout_s: float,
                   max_bytes: int = 0) -> None:
    """Start a new holder on slot ``i``'s node (its old holder died while the node lives on)."""
    prefix = f"tmck-{run_id}-n{i}g{generation}"
    handle = _start_one(holders.node_ids[i], prefix, keep, max_bytes)
    _wait_started([handle], [holders.node_ids[i]], timeout_s)
    holders.replace(i, handle, prefix, prefix)
