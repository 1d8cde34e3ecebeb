"""The fused capture pass: copy, checksum and erasure-code a snapshot in one pass over the data.

The snapshot buffer is ``k`` rows of ``frag_len`` bytes (the layout's fragments). Row by row and
stripe by stripe (a few hundred KiB, so the stripe stays in cache), the pass copies the bytes of
the state that fall in the stripe straight into the row's destination (a holder's mmap'd shared
memory segment), updates that row's streaming xxh3, and once all ``k`` rows hold the stripe, runs
ISA-L over it into the parity rows (and hashes them). Each source byte is read once and written
once; parity is written once; nothing is read back.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from .isal import RSCodec
from .layout import SnapshotLayout

DEFAULT_STRIPE = 256 * 1024


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 array (no copy)."""
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("snapshot tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


@dataclass
class _Piece:
    src: int        # index of the source tensor
    src_off: int
    dst_off: int    # offset inside the stripe
    n: int


class RowPlan:
    """For every (row, stripe): which source bytes land where, and which gaps are zero."""

    def __init__(self, layout: SnapshotLayout, stripe: int = DEFAULT_STRIPE):
        self.layout, self.stripe = layout, max(64, stripe)
        F = layout.frag_len
        self.windows = [(a, min(a + self.stripe, F)) for a in range(0, F, self.stripe)]
        spans = [(i, s.offset, s.offset + s.nbytes) for i, s in enumerate(layout.tensors) if s.nbytes]
        self.pieces: list[list[list[_Piece]]] = []  # [row][window] -> pieces
        for j in range(layout.k):
            row_lo = j * F
            per_window = []
            for a, b in self.windows:
                lo, hi = row_lo + a, row_lo + b
                per_window.append([_Piece(i, max(lo, s) - s, max(lo, s) - lo, min(hi, e) - max(lo, s))
                                   for i, s, e in spans if s < hi and e > lo])
            self.pieces.append(per_window)


def fused_pass(plan: RowPlan, sources: list[np.ndarray], rows: list[np.ndarray], parity: list[np.ndarray],
               codec: RSCodec | None) -> list[int]:
    """Fill ``rows`` (k) and ``parity`` (m) from ``sources`` stripe by stripe; returns the k+m xxh3 digests."""
    hashes = [xxhash.xxh3_64() for _ in range(len(rows) + len(parity))]
    for w, (a, b) in enumerate(plan.windows):
        for j, row in enumerate(rows):
            dst = row[a:b]
            covered = 0
            for p in plan.pieces[j][w]:
                if p.dst_off > covered:
                    dst[covered:p.dst_off] = 0  # alignment gaps and the tail of the last row
                dst[p.dst_off:p.dst_off + p.n] = sources[p.src][p.src_off:p.src_off + p.n]
                covered = p.dst_off + p.n
            if covered < b - a:
                dst[covered:] = 0
            hashes[j].update(memoryview(dst))
        if parity:
            outs = [q[a:b] for q in parity]
            codec.encode([row[a:b] for row in rows], outs)
            for i, out in enumerate(outs):
                hashes[len(rows) + i].update(memoryview(out))
    return [h.intdigest() for h in hashes]


class SegmentMaps:
    """mmap'd holder segments, kept open by inode: holders recycle segments, so a steady state of
    snapshots maps (and page-faults) each segment once, not once per snapshot."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[int, mmap.mmap, np.ndarray]] = {}

    def view(self, path: str, nbytes: int) -> np.ndarray:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        entry = self._maps.get(key)
        if entry is None or len(entry[2]) < nbytes:
            if entry is not None:
                self._close(key)
            fd = os.open(path, os.O_RDWR)
            mm = mmap.mmap(fd, st.st_size)
            entry = (fd, mm, np.frombuffer(mm, dtype=np.uint8))
            self._maps[key] = entry
        return entry[2][:nbytes]

    def prune(self) -> None:
        """Close maps of segments the holder has unlinked (so their memory is really freed)."""
        for key, (fd, _, _) in list(self._maps.items()):
            if os.fstat(fd).st_nlink == 0:
                self._close(key)

    def _close(self, key) -> None:
        fd, mm, arr = self._maps.pop(key)
        del arr
        try:
            mm.close()
        except BufferError:  # a view still alive (a pass in flight): the map closes when it is collected
            pass
        os.close(fd)

    def close(self) -> None:
        for key in list(self._maps):
            self._close(key)
