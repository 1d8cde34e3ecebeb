"""Snapshot holders: one Ray actor per node, keeping fragments in POSIX shared memory.

A holder is its own process, started before the trainers and pinned to its node with
``NodeAffinitySchedulingStrategy``; a trainer that dies loses nothing that its holder stored.
Each fragment is one file in ``/dev/shm`` (tmpfs: memory, not disk), written under a temporary
name and renamed, so a half-written fragment is never visible under its final name. A fragment
is indexed only after its xxh3 checksum matches the writer's; readers verify it again.

A holder keeps the newest ``keep`` committed steps and frees everything older, including steps
that never committed (torn snapshots). Steps newer than the newest commit stay until decided.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import xxhash
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


def shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def segment_glob(prefix: str) -> str:
    return os.path.join(shm_root(), f"{prefix}-*")


def cleanup_segments(prefix: str) -> int:
    """Unlink a dead holder's segments (they outlive its process on tmpfs); returns how many."""
    n = 0
    for path in glob.glob(segment_glob(prefix)):
        try:
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            pass
    return n


def checksum(buf: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(np.ascontiguousarray(buf)).cast("B"))


def write_file(path: str, row: np.ndarray) -> None:
    """Write ``row`` into an existing (pre-allocated) segment file, in place."""
    view = memoryview(np.ascontiguousarray(row).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        off = 0
        while off < len(view):
            off += os.pwrite(fd, view[off:], off)
    finally:
        os.close(fd)


def read_file_into(path: str, out: np.ndarray) -> bool:
    """Read a segment into ``out``; False if it is shorter than ``out`` (truncated)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        off = 0
        while off < len(view):
            n = f.readinto(view[off:])
            if not n:
                return False
            off += n
    return True


class SnapshotHolder:
    """The actor body (wrapped by ``ray.remote`` in :func:`start_holders`).

    Segments are recycled: a freed fragment's file goes to a pool and is handed out again for the
    next snapshot of the same size, so steady-state snapshots write into already-allocated pages.
    A writer on the same node writes its fragments straight into reserved segments
    (:meth:`reserve` then :meth:`adopt`); a writer elsewhere ships them through Ray (:meth:`put`).
    """

    _POOL_MAX = 64

    def __init__(self, prefix: str, keep: int):
        self.prefix, self.keep = prefix, keep
        self._lock = threading.Lock()
        self._frags: dict[tuple[int, int, int], str] = {}
        self._meta: dict[tuple[int, int], str] = {}
        self._committed: list[int] = []
        self._votes: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._pool: dict[int, list[str]] = {}
        self._serial = 0
        cleanup_segments(prefix)  # a previous holder of this name on this node left only garbage

    def ping(self) -> dict[str, Any]:
        with self._lock:
            return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "fragments": len(self._frags)}

    # ---- segments ---------------------------------------------------------------------------
    def _final(self, step: int, rank: int, j: int) -> str:
        return os.path.join(shm_root(), f"{self.prefix}-s{step}-r{rank}-f{j}")

    def _acquire(self, nbytes: int, name: str) -> str:
        """A segment of ``nbytes`` renamed to ``name``: recycled from the pool, else newly allocated."""
        with self._lock:
            pooled = self._pool.get(nbytes)
            path = pooled.pop() if pooled else None
        if path is not None:
            os.rename(path, name)
            return name
        fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(1, nbytes))  # allocate the tmpfs pages now, not while copying
        finally:
            os.close(fd)
        return name

    def _release(self, path: str) -> None:
        """Return a segment to the pool (or unlink it when the pool is full)."""
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        with self._lock:
            pooled = sum(len(v) for v in self._pool.values())
            self._serial += 1
            target = os.path.join(shm_root(), f"{self.prefix}-pool-{self._serial}")
        if pooled >= self._POOL_MAX:
            os.unlink(path)
            return
        os.rename(path, target)
        with self._lock:
            self._pool.setdefault(size, []).append(target)

    def _index(self, step: int, rank: int, j: int, path: str, meta_json: str) -> None:
        final = self._final(step, rank, j)
        with self._lock:
            old = self._frags.pop((step, rank, j), None)
        if old is not None:
            self._release(old)
        os.rename(path, final)  # atomic: a half-written fragment never appears under its final name
        with self._lock:
            self._frags[(step, rank, j)] = final
            self._meta[(step, rank)] = meta_json

    # ---- storing ----------------------------------------------------------------------------
    def reserve(self, step: int, rank: int, indices: list[int], nbytes: int) -> dict[int, str]:
        """Segments a same-node writer fills directly; then it calls :meth:`adopt`."""
        return {j: self._acquire(nbytes, self._final(step, rank, j) + ".tmp") for j in indices}

    def adopt(self, step: int, rank: int, meta_json: str, paths: dict[int, str]) -> int:
        for j, path in paths.items():
            self._index(step, rank, j, path, meta_json)
        return len(paths)

    def put(self, step: int, rank: int, meta_json: str, checksums: list[int], items: dict[int, np.ndarray]) -> int:
        """Store fragments shipped through Ray (index -> bytes); each is verified on arrival."""
        for j, arr in items.items():
            got = checksum(arr)
            if got != checksums[j]:
                raise ValueError(f"step {step} rank {rank} fragment {j}: checksum mismatch on arrival ({got} != {checksums[j]})")
        for j, arr in items.items():
            path = self._acquire(arr.nbytes, self._final(step, rank, j) + ".tmp")
            write_file(path, arr)
            self._index(step, rank, j, path, meta_json)
        return len(items)

    def vote(self, step: int, rank: int) -> None:
        """Phase one, logged: ``rank`` has every fragment of ``step`` acknowledged."""
        with self._lock:
            self._votes[rank] = max(step, self._votes.get(rank, -1))

    def votes(self) -> dict[int, int]:
        with self._lock:
            return dict(self._votes)

    # ---- deciding and freeing -----------------------------------------------------------------
    def commit(self, step: int) -> list[int]:
        """Phase two: step is complete on every rank. Frees steps older than the newest ``keep`` commits."""
        with self._lock:
            if step not in self._committed:
                self._committed = sorted(self._committed + [step])[-self.keep :]
            floor = self._committed[0]
        self._drop(lambda s: s < floor)
        return list(self._committed)

    def pin(self, step: int, pinned: bool = True) -> None:
        """Keep ``step`` through later commits (while the flush tier reads it); ``pinned=False`` releases."""
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(step)

    def rollback(self, step: int | None) -> None:
        """The job restarts from ``step`` (None: from scratch): forget later votes and fragments."""
        limit = -1 if step is None else step
        with self._lock:
            self._votes = {r: min(s, limit) for r, s in self._votes.items() if limit >= 0}
            self._committed = [s for s in self._committed if s <= limit]
        self._drop(lambda s: s > limit)

    def _drop(self, doomed_step) -> None:
        with self._lock:
            doomed = [key for key in self._frags if doomed_step(key[0]) and key[0] not in self._pinned]
            paths = [self._frags.pop(key) for key in doomed]
            for key in [k for k in self._meta if doomed_step(k[0]) and k[0] not in self._pinned]:
                del self._meta[key]
        for path in paths:
            self._release(path)

    # ---- reading ----------------------------------------------------------------------------
    def inventory(self, verify_step: int | None = None) -> dict[str, Any]:
        """{"committed", "votes", "fragments": {"step/rank": [indices]}}; with ``verify_step``,
        that step's fragments are checksummed here and corrupt ones left out (listed in "corrupt")."""
        with self._lock:
            items = list(self._frags.items())
            metas = dict(self._meta)
            out = {"committed": list(self._committed), "votes": dict(self._votes), "corrupt": []}
        frags: dict[str, list[int]] = {}
        for (step, rank, j), path in items:
            if step == verify_step:
                sums = json.loads(metas[(step, rank)])["checksums"]
                buf = np.empty(os.stat(path).st_size, dtype=np.uint8)
                if not read_file_into(path, buf) or checksum(buf) != sums[j]:
                    out["corrupt"].append([step, rank, j])
                    continue
            frags.setdefault(f"{step}/{rank}", []).append(j)
        out["fragments"] = {k: sorted(v) for k, v in frags.items()}
        return out

    def meta(self, step: int, rank: int) -> str | None:
        with self._lock:
            return self._meta.get((step, rank))

    def fetch(self, step: int, rank: int, indices: list[int]) -> tuple[str | None, dict[int, np.ndarray]]:
        """(meta JSON, {index: bytes}) for the fragments of (step, rank) this holder has among ``indices``."""
        with self._lock:
            meta = self._meta.get((step, rank))
            found = {j: self._frags[(step, rank, j)] for j in indices if (step, rank, j) in self._frags}
        out = {}
        for j, path in found.items():
            buf = np.empty(os.stat(path).st_size, dtype=np.uint8)
            read_file_into(path, buf)
            out[j] = buf
        return meta, out

    def paths(self, step: int, rank: int, indices: list[int]) -> dict[int, str]:
        """Segment files of (step, rank) among ``indices``, for a reader on this node."""
        with self._lock:
            return {j: self._frags[(step, rank, j)] for j in indices if (step, rank, j) in self._frags}

    def segment_path(self, step: int, rank: int, j: int) -> str | None:
        with self._lock:
            return self._frags.get((step, rank, j))

    def close(self) -> int:
        with self._lock:
            self._frags.clear()
            self._meta.clear()
            self._pool.clear()
        return cleanup_segments(self.prefix)


@dataclass
class HolderSet:
    """The holders of a job, one per node, in a fixed order (placement indexes into it)."""

    node_ids: list[str]
    handles: list[Any]
    prefixes: list[str]
    dead: set[int] = field(default_factory=set)
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.handles)

    def alive(self) -> list[int]:
        return [i for i in range(len(self.handles)) if i not in self.dead]

    def index_of_node(self, node_id: str) -> int | None:
        try:
            return self.node_ids.index(node_id)
        except ValueError:
            return None

    def check(self, timeout_s: float = 5.0) -> list[int]:
        """Ping every holder believed alive; marks and returns the newly dead (and frees their segments)."""
        indices = self.alive()
        refs = [self.handles[i].ping.remote() for i in indices]
        newly = []
        for i, ref in zip(indices, refs):
            try:
                ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                self.dead.add(i)  # unresponsive: not used any more, but its memory is left alone
                newly.append(i)
            except ray.exceptions.RayError:
                self.dead.add(i)
                cleanup_segments(self.prefixes[i])  # same-machine simulation: the node's tmpfs is gone too
                newly.append(i)
        return newly

    def close(self, timeout_s: float = 10.0) -> None:
        refs = [self.handles[i].close.remote() for i in self.alive()]
        try:
            ray.get(refs, timeout=timeout_s)
        except ray.exceptions.RayError:
            pass
        for i, prefix in enumerate(self.prefixes):
            cleanup_segments(prefix)
            try:
                ray.kill(self.handles[i])
            except Exception:  # already gone
                pass


def start_holders(node_ids: list[str], run_id: str, keep: int, timeout_s: float = 60.0,
                  first_index: int = 0) -> HolderSet:
    """Start one holder per node (before any trainer) and wait until each answers.

    Holders are named actors ``tmck-<run_id>-n<i>`` (so ranks can look them up by name).
    """
    actor_cls = ray.remote(SnapshotHolder)
    handles, prefixes = [], []
    for i, node_id in enumerate(node_ids, start=first_index):
        prefix = f"tmck-{run_id}-n{i}"
        handles.append(
            actor_cls.options(
                name=prefix,
                num_cpus=0,
                max_concurrency=8,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            ).remote(prefix, keep)
        )
        prefixes.append(prefix)
    for i, ref in enumerate([h.ping.remote() for h in handles]):
        try:
            info = ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"snapshot holder on node {node_ids[i]} did not start within {timeout_s:g}s") from None
        if info["node_id"] != node_ids[i]:
            raise RuntimeError(f"snapshot holder {i} landed on node {info['node_id']}, asked for {node_ids[i]}")
    return HolderSet(list(node_ids), handles, prefixes, names=list(prefixes))
