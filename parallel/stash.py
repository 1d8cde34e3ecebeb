"""Saved-activation stashes: what a stage's forward saved for its backward, counted in bytes.

The executor runs each forward under ``torch.autograd.graph.saved_tensors_hooks`` that put every
saved non-parameter tensor into the (stage, microbatch) stash and give autograd only a handle, so
the stash is the one owner of those tensors: releasing it frees them, offloading it moves them to
host buffers. Bytes are counted per distinct storage (views and re-saves count once).
"""

from __future__ import annotations

import torch


class HostPool:
    """Reusable host byte buffers keyed by size; pinned when CUDA is present so device↔host copies
    can run asynchronously. Buffers come back to the pool on reload or release."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self.allocated_bytes = 0
        self._pin = torch.cuda.is_available()

    def take(self, nbytes: int) -> torch.Tensor:
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self._pin)
        self.allocated_bytes += nbytes
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self._free.setdefault(buf.numel(), []).append(buf)


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class Ledger:
    """Device-resident saved bytes across all stashes, with a running peak; each storage is
    counted once and charged to the owner (stage) that saved it first."""

    def __init__(self) -> None:
        self.refs: dict[int, list] = {}  # storage ptr -> [nbytes, live references, owner]
        self.bytes = 0
        self.peak = 0
        self.by_owner: dict = {}

    def hold(self, t: torch.Tensor, owner=None) -> int:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        entry = self.refs.setdefault(ptr, [st.nbytes(), 0, owner])
        if entry[1] == 0:
            self.bytes += entry[0]
            self.by_owner[entry[2]] = self.by_owner.get(entry[2], 0) + entry[0]
            self.peak = max(self.peak, self.bytes)
        entry[1] += 1
        return ptr

    def drop(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            self.by_owner[entry[2]] -= entry[0]
            del self.refs[ptr]


class Stash:
    """One (stage, microbatch)'s saved tensors."""

    def __init__(self, ledger: Ledger, name: str, owner=None) -> None:
        self.ledger = ledger
        self.name = name
        self.owner = owner
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int | None] = []  # None while offloaded
        self.offloaded = False
        self.device: torch.device | None = None
        self._host: tuple[dict[int, torch.Tensor], list] | None = None

    def add(self, t: torch.Tensor) -> int:
        self.tensors.append(t)
        self.ptrs.append(self.ledger.hold(t, self.owner))
        self.device = t.device
        return len(self.tensors) - 1

    def get(self, idx: int) -> torch.Tensor:
        if self.offloaded:
            raise RuntimeError(f"stash {self.name} is offloaded to host; the schedule lacks its RELOAD before this backward")
        return self.tensors[idx]

    def bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in self.tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def offload(self, pool: HostPool) -> None:
        """Copy each distinct storage once to a host buffer (views keep their offset/stride)."""
        hosts: dict[int, torch.Tensor] = {}
        layout = []
        for t in self.tensors:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in hosts:
                buf = pool.take(st.nbytes())
                buf.copy_(_bytes_of(st, t.device), non_blocking=buf.is_pinned())
                hosts[ptr] = buf
            layout.append((ptr, t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride())))
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copy must land before we free
        self._drop_refs()
        self.tensors = []
        self._host = (hosts, layout)
        self.offloaded = True

    def reload(self, pool: HostPool) -> None:
        dev = self.device or torch.device("cpu")
        hosts, layout = self._host
        devs: dict[int, torch.Tensor] = {}
        for ptr, buf in hosts.items():
            d = torch.empty(buf.numel(), dtype=torch.uint8, device=dev)
            d.copy_(buf, non_blocking=buf.is_pinned())
            devs[ptr] = d
        self.tensors = [torch.empty(0, dtype=dtype, device=dev).set_(devs[ptr].untyped_storage(), off, shape, stride)
                        for ptr, dtype, off, shape, stride in layout]
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # host buffers go back to the pool next
        for buf in hosts.values():
            pool.give(buf)
        self._host = None
        self.ptrs = [self.ledger.hold(t, self.owner) for t in self.tensors]
        self.offloaded = False

    def release(self, pool: HostPool) -> None:
        if self.offloaded:
            for buf in self._host[0].values():
                pool.give(buf)
            self._host = None
        else:
            self._drop_refs()
        self.tensors = []
        self.ptrs = []

    def _drop_refs(self) -> None:
        for ptr in self.ptrs:
            if ptr is not None:
                self.ledger.drop(ptr)
        self.ptrs = [None] * len(self.ptrs)


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedBytesMeter:
    """Counts saved-activation bytes of any autograd code (e.g. another pipeline library) while
    active: each saved tensor that is not a parameter nor one of ``exclude`` (the step's own
    inputs and targets) is boxed, and the box's death (autograd freeing it) releases its storage
    from the count. Same counting rule as the executor's stashes."""

    def __init__(self, params, exclude=()) -> None:
        import weakref

        self._weakref = weakref
        self.ledger = Ledger()
        self._param_ptrs = {t.untyped_storage().data_ptr() for t in (*params, *exclude)}
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self._param_ptrs:
            return t
        box = _Box(t)
        self._weakref.finalize(box, self.ledger.drop, self.ledger.hold(t))
        return box

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Box) else h

    def __enter__(self) -> "SavedBytesMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def peak(self) -> int:
        return self.ledger.peak

    @property
    def bytes(self) -> int:
        return self.ledger.bytes
