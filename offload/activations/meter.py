"""The saved-activation meter: device-resident bytes that autograd holds through our saved-tensor hooks.

Bytes are counted per unique storage (views of one buffer count once), so the figure is the memory
those saved tensors really keep alive. Parameters and the host pool's own storage are never counted:
offloaded bytes are reported separately as host bytes.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch


def storage_key(t: torch.Tensor) -> tuple[int, str]:
    s = t.untyped_storage()
    return (s.data_ptr(), str(t.device))


class SavedBytesMeter:
    """Thread-safe live/peak counter of device-resident saved-activation bytes, by unique storage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[int, str], list[int]] = {}  # key -> [refcount, nbytes]
        self.current = 0
        self.peak = 0
        self.host_current = 0
        self.host_peak = 0
        self.tag: object = None
        self.bytes_by_tag: dict[object, int] = defaultdict(int)
        self.ignored: set[int] = set()  # storage pointers never counted (parameters, the host pool)

    def add(self, t: torch.Tensor) -> tuple[int, str] | None:
        """Count ``t``'s storage as held; returns a key for :meth:`release`, or None if not counted."""
        s = t.untyped_storage()
        if s.data_ptr() in self.ignored or s.nbytes() == 0:
            return None
        key = (s.data_ptr(), str(t.device))
        with self._lock:
            entry = self._live.get(key)
            if entry is not None:
                entry[0] += 1
                return key
            nbytes = s.nbytes()
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            if self.tag is not None:
                self.bytes_by_tag[self.tag] += nbytes
        return key

    def release(self, key: tuple[int, str] | None) -> None:
        if key is None:
            return
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]
                self.current -= entry[1]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is currently counted."""
        with self._lock:
            return (t.untyped_storage().data_ptr(), str(t.device)) in self._live

    def add_host(self, nbytes: int) -> None:
        with self._lock:
            self.host_current += nbytes
            self.host_peak = max(self.host_peak, self.host_current)

    def release_host(self, nbytes: int) -> None:
        with self._lock:
            self.host_current = max(0, self.host_current - nbytes)

    def reset_host(self) -> None:
        with self._lock:
            self.host_current = 0

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current
            self.host_peak = self.host_current
            self.bytes_by_tag = defaultdict(int)

    def snapshot(self) -> dict[str, int]:
        """Per-step figures for metrics.jsonl (``peak_saved_bytes`` is the device-resident peak)."""
        out = {"peak_saved_bytes": self.peak, "peak_host_saved_bytes": self.host_peak}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        return out
