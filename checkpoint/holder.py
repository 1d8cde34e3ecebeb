"""Snapshot holders: one Ray actor per node, keeping fragments in POSIX shared memory.

A holder is its own process, started before the trainers and pinned to its node with
``NodeAffinitySchedulingStrategy``; a trainer that dies loses nothing that its holder stored.
Each fragment is one file in ``/dev/shm`` (tmpfs: memory, not disk), written under a temporary
name and renamed, so a half-written fragment is never visible under its final name. Fragments are
hashed once, by the writer (xxh3, recorded in the meta); readers verify them, and so does a
background scrub at the lowest CPU priority, which reports the bad ones for re-encoding.

A holder keeps the newest ``keep`` committed steps and frees everything older, including steps
that never committed (torn snapshots) and segments reserved by a writer that died before it
adopted them. Its memory is accounted in bytes against ``max_bytes``: a put that would pass the
cap is refused with :class:`HolderFull` (the writer skips that snapshot; training goes on).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import ray

from .segments import (checksum, claim, cleanup_segments, read_file_into, reclaim_orphans, shm_free_bytes, shm_root,
                       write_file)

_VOTE_HISTORY = 64


def _count_ranks(keys) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, rank in keys:
        out[str(rank)] = out.get(str(rank), 0) + 1
    return out


class HolderFull(RuntimeError):
    """Storing would pass the holder's byte cap (``checkpoint.holder_bytes``) or /dev/shm's free space."""


class SnapshotHolder:
    """The actor body (wrapped by ``ray.remote`` in :func:`start_holders`).

    Segments are recycled: a freed fragment's file goes to a pool and is handed out again for the
    next snapshot of the same size, so steady-state snapshots write into already-allocated pages.
    A writer on the same node writes its fragments straight into reserved segments
    (:meth:`reserve` then :meth:`adopt`); a writer elsewhere ships them through Ray (:meth:`put`).
    """

    _POOL_MAX = 64

    def __init__(self, prefix: str, keep: int, max_bytes: int = 0):
        self.prefix, self.keep = prefix, keep
        self._lock = threading.Lock()
        self._frags: dict[tuple[int, int, int], str] = {}
        self._meta: dict[tuple[int, int], str] = {}
        self._reserved: dict[str, tuple[int, int]] = {}  # path -> (step, rank) until adopted
        self._sizes: dict[str, int] = {}  # every segment this holder owns -> bytes
        self._committed: list[int] = []
        self._votes: dict[int, list[int]] = {}  # rank -> recent steps it stored, ascending
        self._pinned: set[int] = set()
        self._pool: dict[int, list[str]] = {}
        self._serial = 0
        self._scrubber: threading.Thread | None = None
        self._closing = threading.Event()
        self._scrubbed_bad: list[list[int]] = []
        self.scrubs = 0
        cleanup_segments(prefix)  # a previous holder of this name left only garbage
        claim(prefix)
        self.reclaimed = reclaim_orphans()
        free = shm_free_bytes()
        if max_bytes and max_bytes > free:
            raise HolderFull(f"checkpoint.holder_bytes={max_bytes} but {shm_root()} has {free} bytes free on node "
                             f"{ray.get_runtime_context().get_node_id()[:12]} (fix: lower checkpoint.holder_bytes, "
                             "or enlarge /dev/shm)")
        self.max_bytes = max_bytes or int(free * 0.9)

    def ping(self) -> dict[str, Any]:
        with self._lock:
            return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "fragments": len(self._frags),
                    "bytes": sum(self._sizes.values()), "max_bytes": self.max_bytes, "reserved_by_rank": _count_ranks(self._reserved.values()),
                    "reclaimed_segments": sum(self.reclaimed.values())}

    # ---- segments ---------------------------------------------------------------------------
    def _final(self, step: int, rank: int, j: int) -> str:
        return os.path.join(shm_root(), f"{self.prefix}-s{step}-r{rank}-f{j}")

    def _acquire(self, nbytes: int, name: str) -> str:
        """A segment of ``nbytes`` renamed to ``name``: recycled from the pool, else newly allocated."""
        with self._lock:
            pooled = self._pool.get(nbytes)
            path = pooled.pop() if pooled else None
            if path is None:
                self._make_room(nbytes)
                self._sizes[name] = nbytes  # counted before allocating: concurrent puts see it
            else:
                self._sizes[name] = self._sizes.pop(path)
        if path is not None:
            os.rename(path, name)
            return name
        try:
            fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(1, nbytes))  # allocate the tmpfs pages now, not while copying
            finally:
                os.close(fd)
        except OSError as e:
            self._forget(name)
            raise HolderFull(f"holder {self.prefix}: cannot allocate {nbytes} bytes in {shm_root()}: {e}") from None
        return name

    def _make_room(self, nbytes: int) -> None:
        """Under the lock: unlink pooled segments until ``nbytes`` more fit under the cap, else HolderFull."""
        used = sum(self._sizes.values())
        while used + nbytes > self.max_bytes and self._pool:
            size, paths = next(iter(self._pool.items()))
            path = paths.pop()
            if not paths:
                del self._pool[size]
            used -= self._sizes.pop(path, 0)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if used + nbytes > self.max_bytes:
            raise HolderFull(f"holder {self.prefix}: {nbytes} more bytes would pass its cap of {self.max_bytes} "
                             f"({used} in use; fix: raise checkpoint.holder_bytes or lower checkpoint.keep)")

    def _forget(self, path: str) -> None:
        with self._lock:
            self._sizes.pop(path, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _release(self, path: str) -> None:
        """Return a segment to the pool (or unlink it when the pool is full)."""
        with self._lock:
            size = self._sizes.get(path)
            if size is None:
                return
            if sum(len(v) for v in self._pool.values()) >= self._POOL_MAX:
                target = None
            else:
                self._serial += 1
                target = os.path.join(shm_root(), f"{self.prefix}-pool-{self._serial}")
                self._sizes[target] = self._sizes.pop(path)
        if target is None:
            self._forget(path)
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
            self._sizes[final] = self._sizes.pop(path)
            self._reserved.pop(path, None)
            self._frags[(step, rank, j)] = final
            self._meta[(step, rank)] = meta_json

    # ---- storing ----------------------------------------------------------------------------
    def reserve(self, step: int, rank: int, indices: list[int], nbytes: int) -> dict[int, str]:
        """Segments a same-node writer fills directly; then it calls :meth:`adopt`."""
        out = {}
        for j in indices:
            path = self._acquire(nbytes, self._final(step, rank, j) + ".tmp")
            with self._lock:
                self._reserved[path] = (step, rank)
            out[j] = path
        return out

    def adopt(self, step: int, rank: int, meta_json: str, paths: dict[int, str]) -> int:
        for j, path in paths.items():
            self._index(step, rank, j, path, meta_json)
        return len(paths)

    def put(self, step: int, rank: int, meta_json: str, checksums: list[int], items: dict[int, np.ndarray]) -> int:
        """Store fragments shipped through Ray (index -> bytes). Not hashed here: the writer hashed them
        once; readers and the scrub verify against ``checksums`` (in the meta)."""
        for j, arr in items.items():
            path = self._acquire(arr.nbytes, self._final(step, rank, j) + ".tmp")
            write_file(path, arr)
            self._index(step, rank, j, path, meta_json)
        return len(items)

    def vote(self, step: int, rank: int) -> None:
        """Phase one, logged: ``rank`` has every fragment of ``step`` acknowledged."""
        with self._lock:
            steps = self._votes.setdefault(rank, [])
            if step not in steps:
                steps.append(step)
                steps.sort()
                del steps[:-_VOTE_HISTORY]

    def votes(self) -> dict[int, list[int]]:
        with self._lock:
            return {r: list(s) for r, s in self._votes.items()}

    # ---- deciding and freeing -----------------------------------------------------------------
    def commit(self, step: int, complete: list[int] | None = None) -> list[int]:
        """Phase two: step is complete on every rank. Frees steps older than the newest ``keep`` commits.

        ``complete`` is every step the coordinator holds complete: commits of two steps can arrive out
        of order, and a holder told only of the newer one would free the older while it is still kept.
        """
        with self._lock:
            self._committed = sorted(set(self._committed) | {step} | set(complete or ()))[-self.keep :]
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
            self._votes = {r: [s for s in v if s <= limit] for r, v in self._votes.items()}
            self._committed = [s for s in self._committed if s <= limit]
        self._drop(lambda s: s > limit)

    def _drop(self, doomed_step) -> None:
        with self._lock:
            doomed = [key for key in self._frags if doomed_step(key[0]) and key[0] not in self._pinned]
            paths = [self._frags.pop(key) for key in doomed]
            for key in [k for k in self._meta if doomed_step(k[0]) and k[0] not in self._pinned]:
                del self._meta[key]
            # reserved by a writer that never adopted them (it died, or gave the step up)
            paths += [p for p, (s, _) in self._reserved.items() if doomed_step(s) and s not in self._pinned]
            for p in paths:
                self._reserved.pop(p, None)
        for path in paths:
            self._release(path)

    # ---- scrubbing ---------------------------------------------------------------------------
    def start_scrub(self, every_s: float) -> None:
        """Verify the committed steps' fragments every ``every_s`` seconds, at the lowest CPU priority."""
        if every_s > 0 and self._scrubber is None:
            self._scrubber = threading.Thread(target=self._scrub_loop, args=(every_s,), name="scrub", daemon=True)
            self._scrubber.start()

    def _scrub_loop(self, every_s: float) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while not self._closing.wait(every_s):
            self.scrub()

    def scrub(self) -> list[list[int]]:
        """Checksum every fragment of every committed step kept; returns [step, rank, fragment] of each
        bad one (also kept for :meth:`scrub_report`)."""
        with self._lock:
            steps = list(self._committed)
        bad = [b for step in steps for b in self.inventory(verify_step=step)["corrupt"]]
        with self._lock:
            self._scrubbed_bad += [b for b in bad if b not in self._scrubbed_bad]
            self.scrubs += 1
        return bad

    def scrub_report(self) -> dict[str, Any]:
        """Corrupt fragments the scrub found since the last report, and how many scrubs ran."""
        with self._lock:
            bad, self._scrubbed_bad = self._scrubbed_bad, []
            return {"corrupt": bad, "scrubs": self.scrubs}

    # ---- reading ----------------------------------------------------------------------------
    def inventory(self, verify_step: int | None = None) -> dict[str, Any]:
        """{"committed", "votes", "fragments": {"step/rank": [indices]}}; with ``verify_step``,
        that step's fragments are checksummed here and corrupt ones left out (listed in "corrupt")."""
        with self._lock:
            items = list(self._frags.items())
            metas = dict(self._meta)
            out = {"committed": list(self._committed), "votes": {r: list(v) for r, v in self._votes.items()},
                   "corrupt": []}
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
        self._closing.set()
        with self._lock:
            self._frags.clear()
            self._meta.clear()
            self._pool.clear()
            self._sizes.clear()
            self._reserved.clear()
        return cleanup_segments(self.prefix)
