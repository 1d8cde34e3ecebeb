"""Where a saved tensor lives between forward and backward: kept on the device, or offloaded to the pool.

Both stores are used as ``saved_tensors_hooks(store.pack, store.unpack)``. Parameters pass through
untouched (never offloaded, never metered).

Offload copies run asynchronously through the tiers' one copy engine (which counts every byte):
on CPU its copy thread writes into a pool region; on CUDA a
side stream copies device → pinned pool with an event, ``record_stream`` keeps the source's memory
from being reused before the copy ran, and backward fetches regions back on a second stream (the
block about to run plus ``prefetch_blocks`` ahead), waiting on the D2H event first (a reload must
never race its own offload). A source modified in place before its copy finished is detected
through the tensor's version counter and raised, never silently copied torn.
"""

from __future__ import annotations

import threading

import torch

from ..tiers import CopyEngine, HostPool
from .meter import SavedBytesMeter

WHOLE_STORAGE_RATIO = 4  # copy a view's whole storage when it is at most this many times the view


class _Kept:
    __slots__ = ("t", "key", "meter", "version")

    def __init__(self, t: torch.Tensor, meter: SavedBytesMeter):
        # detached: holding a saved *output* with its grad_fn would make a cycle autograd never frees
        self.t, self.meter, self.version = t.detach(), meter, t._version
        self.key = meter.add(t)

    def get(self) -> torch.Tensor:
        # with saved-tensor hooks autograd no longer checks versions; we do, as autograd would
        if self.t._version != self.version:
            raise RuntimeError(
                f"a tensor {tuple(self.t.shape)} saved for backward was modified by an in-place operation "
                f"(version {self.version} -> {self.t._version}) (fix: remove the in-place op or clone before it)"
            )
        return self.t

    def __del__(self) -> None:
        self.meter.release(self.key)


class KeepStore:
    """Keep saved tensors as they are; only meter them. Gradients are bitwise those of no hooks."""

    def __init__(self, meter: SavedBytesMeter):
        self.meter = meter

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() in self.meter.ignored:
            return t
        return _Kept(t, self.meter)

    def unpack(self, packed) -> torch.Tensor:
        return packed.get() if isinstance(packed, _Kept) else packed


class _Region:
    """One host copy: either a source's whole storage (views rebuilt with their exact strides) or one view."""

    __slots__ = ("host", "src", "src_version", "src_key", "done", "d2h_event", "device", "dev", "dev_key",
                 "h2d_event", "holders", "block", "what", "pool")

    def __init__(self, host: torch.Tensor, src: torch.Tensor, block: int, what: str, pool: int = 0):
        self.host, self.src, self.src_version, self.block, self.what = host, src, src._version, block, what
        self.pool = pool  # id of the pool it lives in: prefetch stays inside one forward's regions
        self.src_key = None
        self.done = None
        self.d2h_event = self.h2d_event = None
        self.device = src.device
        self.dev = None
        self.dev_key = None
        self.holders = 0


def _contiguous_strides(size: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


class _Offloaded:
    __slots__ = ("engine", "region", "dtype", "size", "stride", "offset", "__weakref__")

    def __init__(self, engine: "OffloadEngine", region: _Region, t: torch.Tensor, offset: int, whole: bool):
        self.engine, self.region, self.dtype = engine, region, t.dtype
        # a whole-storage copy keeps the source's strides; a single-view copy is contiguous
        self.size, self.offset = t.size(), offset
        self.stride = t.stride() if whole else _contiguous_strides(t.size())
        engine._hold(region, +1)

    def __del__(self) -> None:
        self.engine._hold(self.region, -1)


class OffloadEngine:
    """The offload store: ``pack``/``unpack`` plus per-block and per-step synchronization."""

    def __init__(self, pool: HostPool, meter: SavedBytesMeter, *, min_bytes: int = 0, prefetch_blocks: int = 1,
                 copier: CopyEngine | None = None):
        self.pool, self.meter, self.min_bytes, self.prefetch_blocks = pool, meter, min_bytes, prefetch_blocks
        self.copier = copier if copier is not None else CopyEngine("cpu")
        self.meter.ignored.add(pool.storage_ptr)
        self._keep = KeepStore(meter)
        self._lock = threading.Lock()
        self._streams: dict[torch.device, tuple] = {}
        self.block = -1
        self._dedupe: dict[tuple, _Region] = {}
        self._unfinished: list[_Region] = []  # forward copies whose source we still hold
        self._by_block: dict[tuple[int, int], list[_Region]] = {}  # (pool, block) -> regions, for prefetch
        self.live_holders = 0

    # ---- step / block boundaries -------------------------------------------------------------
    def use_pool(self, pool: HostPool) -> None:
        """Take the next forward's regions from ``pool`` (one :meth:`HostPool.carve` of the pool
        given at construction). A pipeline has several microbatches in flight: each gets its own,
        which the caller rewinds once that microbatch's backward has let go of its tensors."""
        self.pool = pool

    def release_pool(self, pool: HostPool) -> None:
        """Rewind ``pool`` (a carve handed to :meth:`use_pool`) once its microbatch's backward is done.
        Raises if a tensor offloaded into it is still referenced: its region would be overwritten."""
        keys = [k for k in self._by_block if k[0] == id(pool)]
        held = sum(r.holders for k in keys for r in self._by_block[k])
        if held:
            raise RuntimeError(
                f"{held} offloaded tensors of a finished microbatch are still referenced; their host regions "
                "would be reused (fix: drop the graph after the backward, no retain_graph=True)"
            )
        regions = [r for k in keys for r in self._by_block.pop(k)]
        self._finish(regions)
        self._unfinished = [r for r in self._unfinished if r.pool != id(pool)]
        self.meter.release_host(sum(r.host.numel() for r in regions))
        pool.reset()

    def begin_step(self) -> None:
        if self.live_holders:
            raise RuntimeError(
                f"{self.live_holders} offloaded tensors of the previous step are still referenced "
                "(a graph kept with retain_graph=True, or a stored loss); their pool regions would be "
                "overwritten (fix: run backward and drop the graph before the next step)"
            )
        self.finish_forward()
        for _, h2d in self._streams.values():
            h2d.synchronize()  # no H2D may still read a region we are about to rewrite
        self._by_block.clear()
        self.pool.reset()
        self.meter.reset_host()

    def begin_block(self, index: int) -> None:
        if self.live_holders == 0 and self.pool.used:
            # the previous forward's graph is gone (e.g. gradient accumulation): its regions are free
            self.begin_step()
        self.block = index
        self._dedupe = {}
        self._by_block.setdefault((id(self.pool), index), [])

    def end_block(self) -> None:
        """CPU: wait for this block's copies (the copy thread shares the cores). CUDA: wait for the
        previous block's, so each block's D2H overlaps the next block's forward (MEMO)."""
        self._dedupe = {}
        keep = [r for r in self._unfinished if r.d2h_event is not None and r.block == self.block]
        self._finish([r for r in self._unfinished if r not in keep])
        self._unfinished = keep

    def finish_forward(self) -> None:
        self._finish(self._unfinished)
        self._unfinished = []
        self._dedupe = {}

    def _finish(self, regions: list[_Region]) -> None:
        for r in regions:
            if r.src is None:
                continue
            if r.done is not None:
                r.done.wait()
            elif r.d2h_event is not None:
                r.d2h_event.synchronize()
            if r.src._version != r.src_version:
                raise RuntimeError(
                    f"block {r.block}: a saved {r.what} was modified in place while being offloaded "
                    f"(version {r.src_version} -> {r.src._version}); its copy may be torn "
                    "(fix: keep that block, or remove the in-place op)"
                )
            self.meter.release(r.src_key)
            r.src = r.done = None

    def _hold(self, region: _Region, delta: int) -> None:
        with self._lock:
            region.holders += delta
            self.live_holders += delta
            if region.holders == 0 and region.dev is not None:
                self.meter.release(region.dev_key)
                region.dev = region.dev_key = None

    # ---- pack --------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() in self.meter.ignored or t.numel() == 0:
            return t  # a parameter, or a view of the pool itself (recompute inputs on CPU)
        view_bytes = t.numel() * t.element_size()
        if view_bytes < self.min_bytes:
            return self._keep.pack(t)
        whole = storage.nbytes() <= WHOLE_STORAGE_RATIO * view_bytes
        if whole:
            key = ("s", storage.data_ptr(), str(t.device), t._version)
        else:
            key = ("v", storage.data_ptr(), str(t.device), t._version, t.dtype, t.storage_offset(),
                   tuple(t.size()), tuple(t.stride()))
        region = self._dedupe.get(key)
        if region is None:
            region = self._start_copy(t, whole)
            self._dedupe[key] = region
        offset = t.storage_offset() if whole else 0
        return _Offloaded(self, region, t, offset, whole)

    def _start_copy(self, t: torch.Tensor, whole: bool) -> _Region:
        if whole:
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
            what = f"tensor {tuple(t.shape)} (whole storage, {src.numel()} bytes)"
        else:
            src = t
            what = f"tensor {tuple(t.shape)}"
        nbytes = src.numel() * src.element_size()
        _, host = self.pool.alloc(nbytes, what=f"block {self.block} {what}")
        self.meter.add_host(nbytes)
        dst = host if whole else host.view(t.dtype).view(t.shape)
        region = _Region(host, t.detach(), self.block, what, id(self.pool))  # detached: no cycle through grad_fn
        region.src_key = self.meter.add(t)
        if t.is_cuda:
            d2h, _ = self._cuda_streams(t.device)
            d2h.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(d2h):
                dst.copy_(src, non_blocking=True)
                region.d2h_event = torch.cuda.Event()
                region.d2h_event.record(d2h)
            t.record_stream(d2h)  # the allocator must not hand t's memory out before this copy ran
            self.copier.count("device", "host", nbytes)
        else:
            region.done = self.copier.copy(dst, src, "device", "host", what=f"offload of block {self.block} {what}")
        self._unfinished.append(region)
        self._by_block[(id(self.pool), self.block)].append(region)
        return region

    def _cuda_streams(self, device: torch.device) -> tuple:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    # ---- unpack ------------------------------------------------------------------------------
    def unpack(self, packed) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return self._keep.unpack(packed)
        region = packed.region
        if region.src is not None:
            self._finish([region])  # backward reached a block whose copy is still in flight
            self._unfinished = [r for r in self._unfinished if r is not region]
        if region.device.type == "cuda":
            base = self._fetch(region)
        else:
            base = region.host  # CPU: the pool region is the tensor; nothing to copy back
        typed = base.view(packed.dtype)
        return typed.as_strided(packed.size, packed.stride, typed.storage_offset() + packed.offset)

    def _fetch(self, region: _Region) -> torch.Tensor:
        cur = torch.cuda.current_stream(region.device)
        self._fetch_async(region)
        for ahead in range(1, self.prefetch_blocks + 1):
            for r in self._by_block.get((region.pool, region.block - ahead), []):
                self._fetch_async(r)
        cur.wait_event(region.h2d_event)
        region.dev.record_stream(cur)
        return region.dev

    def _fetch_async(self, region: _Region) -> None:
        if region.dev is not None or region.holders == 0:
            return
        _, h2d = self._cuda_streams(region.device)
        with torch.cuda.stream(h2d):
            h2d.wait_event(region.d2h_event)  # the reload waits for its own offload (Megatron #7398)
            dev = torch.empty(region.host.numel(), dtype=torch.uint8, device=region.device)
            dev.copy_(region.host, non_blocking=True)
            region.h2d_event = torch.cuda.Event()
            region.h2d_event.record(h2d)
        self.copier.count("host", "device", region.host.numel())
        region.dev, region.dev_key = dev, self.meter.add(dev)

    def close(self) -> None:
        self.copier.close()
