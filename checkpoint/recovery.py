"""Read a rank's snapshot back from the holders: verify, decode around losses, re-encode.

Data fragments come from the rank's home holder when it is alive (a restarted trainer reads
its own node). Each fragment's xxh3 is checked against the checksum the writer recorded; a
corrupt or missing fragment is replaced by another copy or rebuilt by Reed-Solomon decoding
from any k good ones. With fewer than k, the error names the rank, step and fragments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from .capture import store_fragments
from .holder_set import HolderSet
from .isal import RSCodec
from .layout import SnapshotLayout
from .segments import checksum, read_file_into


class SnapshotUnavailable(RuntimeError):
    """No usable in-memory copy of a snapshot: too few good fragments. Names rank/step/fragments."""


@dataclass
class FetchedSnapshot:
    step: int
    rank: int
    layout: SnapshotLayout
    meta: dict[str, Any]
    buffer: np.ndarray
    decoded: list[int] = field(default_factory=list)
    """Data fragments rebuilt by decoding (lost or corrupt)."""
    corrupt: list[tuple[int, str]] = field(default_factory=list)
    """(fragment, node id) pairs whose checksum failed."""
    seconds: float = 0.0


def _ask(holders: HolderSet, h: int, method: str, *args: Any, timeout_s: float) -> Any:
    """One holder's answer, or None when it is dead, slow (then suspect) or failed the call."""
    reply = holders.call(method, *args, indices=[h], timeout_s=timeout_s).get(h)
    return None if reply is None or isinstance(reply, BaseException) else reply


def fetch_snapshot(holders: HolderSet, step: int, rank: int, home: int | None = None,
                   timeout_s: float = 60.0) -> FetchedSnapshot:
    """Gather and verify k good fragments of (step, rank) from live holders; decode if needed."""
    t0 = time.perf_counter()
    order = holders.alive()
    if home in order:  # the home holder first: it has all data fragments locally
        order = [home] + [h for h in order if h != home]
    meta: dict[str, Any] | None = None
    for h in order:
        meta_json = _ask(holders, h, "meta", step, rank, timeout_s=timeout_s)
        if meta_json is not None:
            meta = json.loads(meta_json)
            break
    if meta is None:
        raise SnapshotUnavailable(f"rank {rank} step {step}: no live holder has any fragment of it "
                                  f"(dead holders: {sorted(holders.dead)})")
    layout = SnapshotLayout.from_json(meta["layout"])
    k, n, sums = layout.k, layout.k + layout.m, meta["checksums"]
    buffer = np.empty(layout.buffer_len, dtype=np.uint8)
    rows = buffer.reshape(k, layout.frag_len)
    here = ray.get_runtime_context().get_node_id()
    good: dict[int, np.ndarray] = {}
    corrupt: list[tuple[int, str]] = []

    def accept(j: int, h: int, arr: np.ndarray | None) -> None:
        if arr is not None and checksum(arr) == sums[j]:
            good[j] = arr
        else:
            corrupt.append((j, holders.node_ids[h]))

    def gather(indices: range) -> None:
        for h in [h for h in order if h not in holders.dead]:
            want = [j for j in indices if j not in good]
            if not want:
                return
            if holders.node_ids[h] == here:  # same node: read its shared memory straight into place
                paths = _ask(holders, h, "paths", step, rank, want, timeout_s=timeout_s) or {}
                for j, path in paths.items():
                    dst = rows[j] if j < k else np.empty(layout.frag_len, np.uint8)
                    try:
                        ok = read_file_into(path, dst)
                    except FileNotFoundError:  # freed meanwhile
                        continue
                    accept(j, h, dst if ok else None)
                continue
            _, frags = _ask(holders, h, "fetch", step, rank, want, timeout_s=timeout_s) or (None, {})
            for j, arr in frags.items():
                if j < k and arr.nbytes == layout.frag_len:
                    rows[j][:] = arr
                    arr = rows[j]
                accept(j, h, arr)

    gather(range(k))
    if len(good) < k:
        gather(range(k, n))
    if len(good) < k:
        missing = [j for j in range(n) if j not in good and all(j != c for c, _ in corrupt)]
        raise SnapshotUnavailable(
            f"rank {rank} step {step}: {len(good)} good fragments of the k={k} needed; "
            f"corrupt (checksum mismatch): {[f'fragment {j} on node {node[:12]}' for j, node in corrupt]}; "
            f"missing (holder lost): fragments {missing}")
    lost = [j for j in range(k) if j not in good]
    if lost:
        RSCodec(k, layout.m).reconstruct(good, lost, {j: rows[j] for j in lost})
    return FetchedSnapshot(step, rank, layout, meta, buffer, lost, corrupt, time.perf_counter() - t0)


def reencode(holders: HolderSet, snap: FetchedSnapshot, home: int, timeout_s: float = 60.0) -> None:
    """Restore full redundancy of a recovered snapshot on the live holders, then mark it committed."""
    layout = snap.layout
    rows = [snap.buffer.reshape(layout.k, layout.frag_len)[i] for i in range(layout.k)]
    rows += [np.empty(layout.frag_len, np.uint8) for _ in range(layout.m)]
    RSCodec(layout.k, layout.m).encode(rows[: layout.k], rows[layout.k :])
    sums = [checksum(r) for r in rows]
    meta = dict(snap.meta, checksums=sums)
    store_fragments(holders, home, snap.step, snap.rank, json.dumps(meta, separators=(",", ":"), sort_keys=True),
                    sums, rows, layout.k, layout.m, timeout_s)
    holders.call("commit", snap.step, timeout_s=timeout_s)
