"""Saved-activation stashes: what a stage's forward saved for its backward, counted in bytes.

The executor runs each forward under ``torch.autograd.graph.saved_tensors_hooks`` that put every
saved non-parameter tensor into the (stage, microbatch) stash and give autograd only a handle, so
the stash is the one owner of those tensors: releasing it frees them, offloading it moves them to
host memory. Bytes are counted per distinct storage (views and re-saves count once).

Offload and reload go through offload/'s tiers: the bytes move on the one :class:`CopyEngine`
(a worker thread on CPU, a side stream with an event per copy on CUDA) into slots of a
:class:`HostPool` allocated once (:class:`StashSlots`). An OFFLOAD only starts the copies; the
device bytes are let go when they have landed (``settle``), which the executor does before its
next allocation, so the device never holds an offloaded stash beside a new one. A RELOAD
allocates the device buffers and starts the copies; each saved tensor waits for its own copy
when backward first reads it.
"""

from __future__ import annotations

import torch

from trainmem.offload import CopyEngine, HostPool

from .ir import Action, Kind

ALIGN = 256  # bytes between storages in a slot: keeps every dtype view aligned


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def offload_slots(actions: list[Action]) -> dict[int, int]:
    """Per stage, the most stashes one rank's ``actions`` hold offloaded at once (a stash takes its
    slot at OFFLOAD and gives it back when its backward ends, W or BW)."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    out: set[tuple[int, int]] = set()
    for a in actions:
        if a.kind is Kind.OFFLOAD:
            out.add((a.stage, a.mb))
            live[a.stage] = live.get(a.stage, 0) + 1
            peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
        elif a.kind in (Kind.W, Kind.BW) and (a.stage, a.mb) in out:
            out.discard((a.stage, a.mb))
            live[a.stage] -= 1
    return peak


def measure_copy_bandwidth(copier: CopyEngine, nbytes: int, *, trips: int = 3) -> float:
    """Device -> host bytes per second of ``copier`` (best of ``trips``) on a buffer of ``nbytes``
    (at least 1 MiB), the way an OFFLOAD moves a stash: into a pinned host buffer on CUDA."""
    import time

    nbytes = max(int(nbytes), 1 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=copier.device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=copier.cuda)
    dst.copy_(src)  # first touch of the destination pages is not bandwidth
    best = float("inf")
    for _ in range(trips):
        copier.synchronize()
        t0 = time.perf_counter()
        copier.copy(dst, src, "device", "host", what="bandwidth probe").wait()
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9)


class StashSlots:
    """Host slots for offloaded stashes, keyed by (stage, microbatch).

    Stage s gets ``counts[s]`` slots (the schedule's most concurrently offloaded stashes of s), each
    as large as the first stash of s offloaded (one microbatch's; every microbatch has the same
    shapes), carved once from one host pool per stage (pinned on CUDA). A stash that does not fit
    its slot is an error, never a bigger pool.
    """

    def __init__(self, counts: dict[int, int], *, pin: bool = False) -> None:
        self.counts, self.pin = dict(counts), pin
        self.pools: dict[int, HostPool] = {}
        self._free: dict[int, list[torch.Tensor]] = {}
        self._taken: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def allocated_bytes(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    def take(self, stage: int, mb: int, sizes: list[int]) -> list[torch.Tensor]:
        """Host regions (uint8) for one stash's storages of ``sizes`` bytes, in one slot."""
        need = sum(_align(n) for n in sizes)
        if stage not in self.pools:
            n = self.counts.get(stage, 0)
            if n < 1:
                raise RuntimeError(f"stage {stage}: the schedule never offloads this stage, yet a stash was offloaded")
            pool = self.pools[stage] = HostPool(n * need, pin=self.pin)
            self._free[stage] = [pool.alloc(need, what=f"stage {stage} stash slot")[1] for _ in range(n)]
        if not self._free[stage]:
            raise RuntimeError(f"stage {stage}: all {self.counts[stage]} host slots are taken when microbatch {mb} "
                               "is offloaded (the schedule offloads more stashes at once than it was sized for)")
        slot = self._free[stage][-1]
        if need > slot.numel():
            raise RuntimeError(f"stage {stage} microbatch {mb}: its stash needs {need} host bytes but a slot holds "
                               f"{slot.numel()} (the stash grew between microbatches: shapes must not change)")
        self._taken[(stage, mb)] = self._free[stage].pop()
        regions, offset = [], 0
        for n in sizes:
            regions.append(slot[offset: offset + n])
            offset += _align(n)
        return regions

    def give(self, stage: int, mb: int) -> None:
        self._free[stage].append(self._taken.pop((stage, mb)))


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
    """One (stage, microbatch)'s saved tensors: resident, offloading, offloaded or reloaded."""

    def __init__(self, ledger: Ledger, stage: int, mb: int) -> None:
        self.ledger, self.stage, self.mb = ledger, stage, mb
        self.name = f"{stage}:{mb}"
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int | None] = []  # None while offloaded
        self.offloaded = False
        self.device: torch.device | None = None
        self._layout: list[tuple] = []  # per tensor: (storage index, dtype, offset, shape, stride)
        self._copies: list = []  # copy-engine handles in flight: D2H after offload, H2D after reload
        self._storages: list[torch.UntypedStorage] = []  # device storages an offload copies from
        self._pending: dict[int, object] = {}  # tensor index -> H2D handle its first read waits for
        self._slots: StashSlots | None = None

    def add(self, t: torch.Tensor) -> int:
        self.tensors.append(t)
        self.ptrs.append(self.ledger.hold(t, self.stage))
        self.device = t.device
        return len(self.tensors) - 1

    def get(self, idx: int, copier: CopyEngine) -> torch.Tensor:
        if self.offloaded:
            raise RuntimeError(f"stash {self.name} is offloaded to host; the schedule lacks its RELOAD before this backward")
        handle = self._pending.pop(idx, None)
        if handle is not None:
            copier.wait_on_compute(handle)
        return self.tensors[idx]

    def bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in self.tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    def offload(self, slots: StashSlots, copier: CopyEngine) -> None:
        """Start copying each distinct storage once into a host slot (views keep offset/stride)."""
        index: dict[int, int] = {}
        self._storages, self._layout = [], []
        for t in self.tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in index:
                index[st.data_ptr()] = len(self._storages)
                self._storages.append(st)
            self._layout.append((index[st.data_ptr()], t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride())))
        regions = slots.take(self.stage, self.mb, [st.nbytes() for st in self._storages])
        self._copies = [copier.copy(host, _bytes_of(st, self.device), "device", "host", what=f"offload of stash {self.name}")
                        for host, st in zip(regions, self._storages)]
        self._host, self._slots = regions, slots
        self.offloaded = True

    def settle(self, free: set[int] = frozenset()) -> None:
        """Once the offload copies have landed, let the device bytes go. ``free``: storages (data
        pointers) to release even though the executor still holds a tensor on them (the stage input)."""
        for handle in self._copies:
            if handle.event is None:
                handle.wait()  # CPU: the copy thread must be done reading; CUDA: record_stream guards the source
        self._copies = []
        self._drop_refs()
        self.tensors = []
        for st in self._storages:
            if st.data_ptr() in free and st.data_ptr() not in self.ledger.refs:  # no other stash saved it
                st.resize_(0)
        self._storages = []

    @property
    def settling(self) -> bool:
        return bool(self._storages)

    def reload(self, copier: CopyEngine) -> None:
        """Allocate the device storages again and start copying the host slot back into them."""
        dev = self.device or torch.device("cpu")
        bufs = [torch.empty(host.numel(), dtype=torch.uint8, device=dev) for host in self._host]
        handles = [copier.copy(buf, host, "host", "device", what=f"reload of stash {self.name}")
                   for buf, host in zip(bufs, self._host)]
        self.tensors = [torch.empty(0, dtype=dtype, device=dev).set_(bufs[i].untyped_storage(), off, shape, stride)
                        for i, dtype, off, shape, stride in self._layout]
        self._pending = {j: handles[i] for j, (i, *_rest) in enumerate(self._layout)}
        self._copies = handles
        self.ptrs = [self.ledger.hold(t, self.stage) for t in self.tensors]
        self.offloaded = False

    def release(self) -> None:
        if self.settling:
            self.settle()
        if self._slots is not None:
            # The slot may go to the next offload at once: the copy engine runs copies in submission
            # order (one thread on CPU, one stream on CUDA), so that offload writes after this reload read.
            self._slots.give(self.stage, self.mb)
            self._slots, self._host = None, None
        self._drop_refs()
        self.tensors, self.ptrs, self._pending, self._copies = [], [], {}, []

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
