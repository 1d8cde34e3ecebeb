"""The one copy engine: every byte moved between tiers goes through it and is counted.

Tier pairs are named ``"src->dst"`` over ``device``, ``host`` and ``disk``. On CPU the copies run on
worker threads (one for memory copies, one for disk I/O, so a slow disk never holds up a gather);
each is one thread, so copies of one kind finish in submission order; on CUDA device<->host copies run on a side stream with an event per copy, so compute overlaps
them and a consumer waits on exactly the copy it needs. ``stall_s`` is the time callers spent
blocked in :meth:`Handle.wait`: the part of the traffic that did not hide under compute.
Collectives that move bytes (all-gather, all-to-all) are counted with :meth:`count`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

TIERS = ("device", "host", "disk")
WAIT_TIMEOUT_S = 300.0


def pair(src: str, dst: str) -> str:
    if src not in TIERS or dst not in TIERS:
        raise ValueError(f"tier pair {src!r}->{dst!r}: tiers are {', '.join(TIERS)}")
    return f"{src}->{dst}"


class Handle:
    """One submitted copy: a thread future (CPU, disk) or a CUDA event."""

    __slots__ = ("engine", "future", "event", "what")

    def __init__(self, engine: "CopyEngine", what: str, future: Future | None = None, event=None):
        self.engine, self.what, self.future, self.event = engine, what, future, event

    def done(self) -> bool:
        if self.future is not None:
            return self.future.done()
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block until the copy finished; the blocked time counts as stall. Re-raises the copy's error."""
        if self.done():
            if self.future is not None:
                self.future.result()
            return
        t0 = time.perf_counter()
        try:
            if self.future is not None:
                try:
                    self.future.result(timeout=WAIT_TIMEOUT_S)
                except TimeoutError:
                    raise TimeoutError(f"copy engine: {self.what} did not finish in {WAIT_TIMEOUT_S:.0f} s "
                                       "(a disk or copy thread is stuck)") from None
            else:
                self.event.synchronize()
        finally:
            self.engine._add_stall(time.perf_counter() - t0)


class CopyEngine:
    """Moves and counts bytes between tiers. ``device`` picks threads (CPU) or streams (CUDA)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self.moved: dict[str, int] = defaultdict(int)
        self.stall_s = 0.0
        self._copy_pool: ThreadPoolExecutor | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        self._stream = None

    # ---- counters ----------------------------------------------------------------------------
    def count(self, src: str, dst: str, nbytes: int) -> None:
        with self._lock:
            self.moved[pair(src, dst)] += int(nbytes)

    def _add_stall(self, seconds: float) -> None:
        with self._lock:
            self.stall_s += seconds

    def stats(self) -> dict[str, float | int]:
        """Bytes per tier pair and stall seconds since the last :meth:`reset_stats`."""
        with self._lock:
            out: dict[str, float | int] = {f"moved_{k.replace('->', '_to_')}_bytes": v for k, v in self.moved.items()}
            out["copy_stall_s"] = self.stall_s
        return out

    def reset_stats(self) -> None:
        with self._lock:
            self.moved = defaultdict(int)
            self.stall_s = 0.0

    # ---- memory copies ------------------------------------------------------------------------
    def copy(self, dst: torch.Tensor, src: torch.Tensor, src_tier: str, dst_tier: str, *, what: str = "copy") -> Handle:
        """``dst.copy_(src)`` asynchronously; counted as ``src_tier->dst_tier``."""
        nbytes = src.numel() * src.element_size()
        self.count(src_tier, dst_tier, nbytes)
        if self.cuda and (dst.is_cuda or src.is_cuda):
            stream = self._cuda_stream()
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            for t in (dst, src):
                if t.is_cuda:
                    t.record_stream(stream)  # the allocator must not reuse either before the copy ran
            return Handle(self, what, event=event)
        pair = [dst, src]

        def run() -> None:  # keeps no reference once done: a copied-out source can be freed at once
            d, s = pair
            pair.clear()
            d.copy_(s)

        return Handle(self, what, future=self._pool("copy").submit(run))

    def wait_on_compute(self, handle: Handle) -> None:
        """CUDA: make the compute stream wait for ``handle`` without blocking the host; CPU: wait."""
        if handle.event is not None:
            torch.cuda.current_stream(self.device).wait_event(handle.event)
        else:
            handle.wait()

    def run(self, fn: Callable[[], object], src_tier: str, dst_tier: str, nbytes: int, *, what: str) -> Handle:
        """Run ``fn`` on the I/O thread (disk reads and writes); counted as ``src_tier->dst_tier``."""
        self.count(src_tier, dst_tier, nbytes)
        return Handle(self, what, future=self._pool("io").submit(fn))

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        with self._lock:
            if kind == "copy":
                if self._copy_pool is None:
                    self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="trainmem-copy")
                return self._copy_pool
            if self._io_pool is None:
                self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="trainmem-io")
            return self._io_pool

    def _cuda_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def synchronize(self) -> None:
        """Wait for every copy submitted so far (threads drained, CUDA stream synchronized)."""
        for pool in (self._copy_pool, self._io_pool):
            if pool is not None:
                pool.submit(lambda: None).result(timeout=WAIT_TIMEOUT_S)
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        for pool in (self._copy_pool, self._io_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._copy_pool = self._io_pool = None
