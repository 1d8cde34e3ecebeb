"""The device tier: one byte-capped arena of equal slots, allocated once.

On a GPU the arena is one CUDA tensor; on CPU it is one host tensor standing in for device memory.
Either way a chunk can only be computed on while it occupies a slot: the engine points parameters
at slot views and nowhere else, so ``capacity`` is a hard budget (the arena cannot hold more than
``n_slots`` chunks) rather than a counter beside free-floating tensors. ``peak_bytes`` is the most
slot bytes ever in use at once.
"""

from __future__ import annotations

import torch


class ArenaFull(RuntimeError):
    """Every slot is taken by a chunk that may not be evicted now."""


class DeviceArena:
    def __init__(self, capacity_bytes: int, slot_bytes: int, device: torch.device | str = "cpu"):
        if slot_bytes <= 0 or slot_bytes % 64:
            raise ValueError(f"slot_bytes={slot_bytes} must be a positive multiple of 64")
        self.device = torch.device(device)
        self.capacity = int(capacity_bytes)
        self.slot_bytes = int(slot_bytes)
        self.n_slots = self.capacity // self.slot_bytes
        if self.n_slots < 1:
            raise ValueError(f"capacity_bytes={capacity_bytes} holds no slot of {slot_bytes} bytes")
        self.buffer = torch.empty(self.n_slots * self.slot_bytes, dtype=torch.uint8, device=self.device)
        self._base = self.buffer.data_ptr()
        self._storage = self.buffer.untyped_storage().data_ptr()
        self._free = list(range(self.n_slots - 1, -1, -1))
        self.owner: dict[int, object] = {}
        self.peak_slots = 0

    @property
    def used_slots(self) -> int:
        return self.n_slots - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_slots * self.slot_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_slots * self.slot_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes the arena really holds (its one tensor): never above ``capacity``."""
        return self.buffer.numel()

    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self, owner: object) -> int:
        if not self._free:
            raise ArenaFull(f"device arena full: {self.n_slots} slots of {self.slot_bytes} bytes all in use")
        slot = self._free.pop()
        self.owner[slot] = owner
        self.peak_slots = max(self.peak_slots, self.used_slots)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self.owner:
            raise ValueError(f"slot {slot} is not allocated")
        del self.owner[slot]
        self._free.append(slot)

    def view(self, slot: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.buffer[start: start + self.slot_bytes].view(dtype)

    def slot_of(self, t: torch.Tensor) -> int | None:
        """The slot ``t``'s storage lies in, or None when it is not arena memory."""
        if t.device != self.device or t.untyped_storage().data_ptr() != self._storage:
            return None
        offset = t.data_ptr() - self._base
        if 0 <= offset < self.buffer.numel():
            return offset // self.slot_bytes
        return None

    def contains(self, t: torch.Tensor) -> bool:
        """Whether every byte ``t`` can address lies inside the arena."""
        slot = self.slot_of(t)
        if slot is None or t.numel() == 0:
            return slot is not None
        first = t.data_ptr() - self._base
        span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
        return first >= 0 and first + span <= self.buffer.numel()

    def reset_peak(self) -> None:
        self.peak_slots = self.used_slots
