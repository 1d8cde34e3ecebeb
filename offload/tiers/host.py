"""The host tier: one buffer pool allocated once (pinned when CUDA is there), never grown.

MemAscend's lesson: one arena and offsets, never a per-tensor host allocation, so nothing fragments
and the pool can never grow past its size. Activation offload bump-allocates regions per step and
:meth:`reset` rewinds once the previous step's copies have finished; parameter placement carves its
chunk-shard slabs once at set-up and never rewinds. ``high_water`` is the pool's peak use.
"""

from __future__ import annotations

import threading

import torch

ALIGN = 256  # bytes: keeps every dtype view aligned and suits DMA on GPUs
DIRECT_IO_ALIGN = 4096  # O_DIRECT needs buffers, offsets and lengths aligned to the block size


class HostPoolFull(RuntimeError):
    """The pool has no room for a tensor: the plan under-estimated, or the input grew."""


class HostPool:
    def __init__(self, nbytes: int, *, pin: bool = False, align_base: int = DIRECT_IO_ALIGN):
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        self.capacity = int(nbytes)
        self.pinned = bool(pin and nbytes > 0)
        # over-allocate so offset 0 sits on an align_base boundary (O_DIRECT buffers)
        raw = torch.empty(self.capacity + align_base, dtype=torch.uint8, pin_memory=self.pinned)
        skip = (-raw.data_ptr()) % align_base
        self.arena = raw[skip: skip + self.capacity]
        self.used = 0
        self.high_water = 0
        self._lock = threading.Lock()

    @property
    def storage_ptr(self) -> int:
        return self.arena.untyped_storage().data_ptr()

    def alloc(self, nbytes: int, what: str = "tensor", align: int = ALIGN) -> tuple[int, torch.Tensor]:
        """Reserve ``nbytes``; returns (offset, uint8 view). Raises :class:`HostPoolFull`, never grows."""
        with self._lock:
            start = -(-self.used // align) * align
            end = start + int(nbytes)
            if end > self.capacity:
                raise HostPoolFull(
                    f"host pool of {self.capacity} bytes is full: {what} needs {nbytes} bytes at offset {start} "
                    f"(fix: raise memory.host_pool_bytes or re-plan with this batch/sequence length)"
                )
            self.used = end
            self.high_water = max(self.high_water, end)
        return start, self.arena[start:end]

    def carve(self, nbytes: int, what: str = "sub-pool") -> "HostPool":
        """A pool over ``nbytes`` of this one (same storage, nothing new allocated), with its own
        bump offset and :meth:`reset`: one per in-flight unit whose regions are freed together
        (a pipeline's microbatch)."""
        _, region = self.alloc(nbytes, what=what, align=DIRECT_IO_ALIGN)
        child = HostPool.__new__(HostPool)
        child.capacity, child.pinned, child.arena = int(nbytes), self.pinned, region
        child.used = child.high_water = 0
        child._lock = threading.Lock()
        return child

    def reset(self) -> None:
        """Rewind to empty. The caller guarantees no copy still reads or writes a region."""
        with self._lock:
            self.used = 0
