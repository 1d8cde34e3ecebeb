"""Where this rank's chunk shards live between uses: host slabs, or disk slots behind a staging ring.

Host-homed shards are slabs carved once from the host pool. Disk-homed ones live in the rank's
slot file; a ring of staging slabs per state holds the few in use, so the optimizer can read the
next chunk's shard while it updates the current one and the previous one is still being written
(the I/O thread runs requests in order, so a read queued behind a write of the same slab is safe).
"""

from __future__ import annotations

import torch

from ..tiers import DIRECT_IO_ALIGN, CopyEngine, DiskSlots, Handle, HostPool
from .layout import STATES, ChunkLayout
from .planner import STAGING_SETS


class _Staged:
    __slots__ = ("slab", "chunk", "handle", "pinned", "used")

    def __init__(self, slab: torch.Tensor):
        self.slab, self.chunk, self.handle, self.pinned, self.used = slab, None, None, False, 0


class ShardStore:
    def __init__(self, layout: ChunkLayout, homes: dict[str, str], *, pool: HostPool, disk: DiskSlots | None,
                 engine: CopyEngine):
        self.layout, self.homes, self.pool, self.disk, self.engine = layout, homes, pool, disk, engine
        self.shard_bytes = layout.shard_bytes
        self.host: dict[tuple[str, int], torch.Tensor] = {}
        self.staging: dict[str, list[_Staged]] = {}
        self._clock = 0
        for state in STATES:
            if homes[state] == "host":
                for c in range(layout.n_chunks):
                    self.host[state, c] = self._slab(f"{state} shard of chunk {c}")
            else:
                if disk is None:
                    raise ValueError(f"state {state!r} is homed on disk but there is no disk tier")
                self.staging[state] = [_Staged(self._slab(f"{state} staging")) for _ in range(STAGING_SETS)]

    def _slab(self, what: str) -> torch.Tensor:
        _, raw = self.pool.alloc(self.shard_bytes, what=what, align=DIRECT_IO_ALIGN)
        return raw.view(torch.float32)

    def _disk_slot(self, state: str, chunk: int) -> int:
        return STATES.index(state) * self.layout.n_chunks + chunk

    def _find(self, state: str, chunk: int) -> _Staged | None:
        return next((s for s in self.staging[state] if s.chunk == chunk), None)

    def _claim(self, state: str) -> _Staged:
        free = [s for s in self.staging[state] if not s.pinned]
        if not free:
            raise RuntimeError(f"every {state} staging slab is in use (more than {STAGING_SETS} shards held at once)")
        return min(free, key=lambda s: (s.chunk is not None, s.used))

    def _load(self, state: str, chunk: int, read: bool) -> _Staged:
        staged = self._claim(state)
        self._clock += 1
        staged.chunk, staged.used = chunk, self._clock  # a prefetched slab counts as recently used
        if read:  # queued behind any write of this slab on the one I/O thread
            staged.handle = self.disk.read(self._disk_slot(state, chunk), staged.slab, what=f"{state} {chunk}")
        elif staged.handle is not None:
            staged.handle.wait()  # the caller overwrites the slab: its last write must be out first
            staged.handle = None
        return staged

    def prefetch(self, state: str, chunk: int) -> None:
        if self.homes[state] == "host" or chunk >= self.layout.n_chunks or self._find(state, chunk) is not None:
            return
        self._load(state, chunk, read=True)

    def get(self, state: str, chunk: int, *, read: bool = True) -> torch.Tensor:
        """The shard as a host tensor, held until :meth:`put`. ``read=False``: the caller overwrites it."""
        if self.homes[state] == "host":
            return self.host[state, chunk]
        staged = self._find(state, chunk) or self._load(state, chunk, read)
        if staged.handle is not None:
            staged.handle.wait()
            staged.handle = None
        self._clock += 1
        staged.pinned, staged.used = True, self._clock
        return staged.slab

    def put(self, state: str, chunk: int, *, dirty: bool) -> None:
        if self.homes[state] == "host":
            return
        staged = self._find(state, chunk)
        staged.pinned = False
        if dirty:
            staged.handle = self.disk.write(self._disk_slot(state, chunk), staged.slab, what=f"{state} {chunk}")

    def read_copy(self, state: str, chunk: int) -> torch.Tensor:
        """The shard's current value in a tensor of its own (checkpoints of disk-homed state)."""
        if self.homes[state] == "host":
            return self.host[state, chunk]
        out = torch.empty(self.layout.shard_elems, dtype=torch.float32)
        out.copy_(self.get(state, chunk))
        self.put(state, chunk, dirty=False)
        return out

    def flush(self) -> None:
        for ring in self.staging.values():
            for s in ring:
                if s.handle is not None:
                    s.handle.wait()
                    s.handle = None

    def handles(self) -> list[Handle]:
        return [s.handle for ring in self.staging.values() for s in ring if s.handle is not None]
