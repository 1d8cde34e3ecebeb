"""A host buffer pool allocated once (pinned when CUDA is there), bump-allocated per step.

MemAscend's lesson: one arena and offsets, never a per-tensor host allocation, so nothing fragments
and the pool can never grow past its size. Each step allocates regions from the start and
:meth:`reset` rewinds once the previous step's copies have finished.
"""

from __future__ import annotations

import threading

import torch

ALIGN = 256  # bytes: keeps every dtype view aligned and suits DMA on GPUs


class HostPoolFull(RuntimeError):
    """The pool has no room for a tensor: the plan under-estimated, or the input grew."""


class HostPool:
    def __init__(self, nbytes: int, *, pin: bool = False):
        if nbytes < 0:
            raise ValueError(f"nbytes={nbytes} must be >= 0")
        self.capacity = int(nbytes)
        self.pinned = bool(pin and nbytes > 0)
        self.arena = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self.used = 0
        self.high_water = 0
        self._lock = threading.Lock()

    @property
    def storage_ptr(self) -> int:
        return self.arena.untyped_storage().data_ptr()

    def alloc(self, nbytes: int, what: str = "tensor") -> tuple[int, torch.Tensor]:
        """Reserve ``nbytes``; returns (offset, uint8 view). Raises :class:`HostPoolFull`, never grows."""
        with self._lock:
            start = -(-self.used // ALIGN) * ALIGN
            end = start + int(nbytes)
            if end > self.capacity:
                raise HostPoolFull(
                    f"host pool of {self.capacity} bytes is full: {what} needs {nbytes} bytes at offset {start} "
                    f"(fix: raise memory.host_pool_bytes or re-plan with this batch/sequence length)"
                )
            self.used = end
            self.high_water = max(self.high_water, end)
        return start, self.arena[start:end]

    def reset(self) -> None:
        """Rewind to empty. The caller guarantees no copy still reads or writes a region."""
        with self._lock:
            self.used = 0
