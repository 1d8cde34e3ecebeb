"""The disk tier: one preallocated slot file per rank, read and written on the copy engine's I/O thread.

Every slot is the same size and keyed by an integer the caller assigns (a chunk shard), so the file
never grows, never fragments, and one file per rank and path is all that is ever created (no swap
files named by object id piling up). The file is opened with O_DIRECT where the filesystem allows
it, so reads really come from the disk rather than the page cache; buffers must then be aligned
to :data:`DIRECT_IO_ALIGN` (the host pool hands out such slabs). There is no size below which
data silently stays in RAM: whatever the plan homes on disk goes to disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .copy import CopyEngine, Handle
from .host import DIRECT_IO_ALIGN


class DiskFull(OSError):
    """The disk path has no room for the slot file."""


def round_up(n: int, align: int = DIRECT_IO_ALIGN) -> int:
    return -(-int(n) // align) * align


class DiskSlots:
    def __init__(self, directory: str | Path, *, rank: int, slot_bytes: int, n_slots: int, engine: CopyEngine,
                 name: str = "placement"):
        self.directory = Path(directory)
        self.slot_bytes = round_up(slot_bytes)
        self.n_slots = int(n_slots)
        self.engine = engine
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"trainmem-{name}-rank{rank}.slots"
        size = self.slot_bytes * self.n_slots
        free = shutil.disk_usage(self.directory).free + (self.path.stat().st_size if self.path.exists() else 0)
        if size > free:
            raise DiskFull(f"disk_path={str(self.directory)!r}: the slot file needs {size} bytes, {free} are free")
        self.direct = True
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
            self.direct = False
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, 0)  # a stale file from a dead run holds nothing we may read
        if size:
            os.posix_fallocate(self.fd, 0, size)

    def _buffer(self, t: torch.Tensor, nbytes: int) -> memoryview:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("disk I/O needs a contiguous host tensor")
        if self.direct and (t.data_ptr() % DIRECT_IO_ALIGN or nbytes % DIRECT_IO_ALIGN):
            raise ValueError(f"O_DIRECT needs {DIRECT_IO_ALIGN}-byte aligned buffers and lengths "
                             f"(got address {t.data_ptr()}, {nbytes} bytes)")
        return memoryview(t.view(torch.uint8).numpy()).cast("B")[:nbytes]

    def _check(self, slot: int, nbytes: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"disk slot {slot} outside 0..{self.n_slots - 1}")
        if nbytes > self.slot_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a disk slot of {self.slot_bytes}")

    def _prepare(self, slot: int, t: torch.Tensor) -> tuple[memoryview, int, int]:
        nbytes = t.numel() * t.element_size()
        if self.direct:
            nbytes = round_up(nbytes)
        self._check(slot, nbytes)
        return self._buffer(t, nbytes), slot * self.slot_bytes, nbytes

    def write(self, slot: int, src: torch.Tensor, *, what: str = "shard") -> Handle:
        """Write ``src`` (host, aligned) to ``slot``; the caller keeps ``src`` unchanged until the handle is done."""
        buf, offset, nbytes = self._prepare(slot, src)

        def go() -> None:
            done = 0
            while done < nbytes:
                done += os.pwritev(self.fd, [buf[done:]], offset + done)

        return self.engine.run(go, "host", "disk", nbytes, what=f"write {what} to {self.path.name}[{slot}]")

    def read(self, slot: int, dst: torch.Tensor, *, what: str = "shard") -> Handle:
        """Read ``slot`` into ``dst`` (host, aligned)."""
        buf, offset, nbytes = self._prepare(slot, dst)

        def go() -> None:
            done = 0
            while done < nbytes:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{self.path}: short read at slot {slot}")
                done += n

        return self.engine.run(go, "disk", "host", nbytes, what=f"read {what} from {self.path.name}[{slot}]")

    def close(self, *, remove: bool = True) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if remove:
                self.path.unlink(missing_ok=True)
