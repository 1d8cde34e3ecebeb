"""Capture: stage a rank's state into reused host buffers off the training loop, encode, store.

The loop calls ``capture(step, tensors, meta)`` right after ``optimizer.step()`` and ``wait()``
right before the next one. Between the two, parameters and optimizer state do not change
(DataStates-style lazy copy), so a copier thread reads them in place while forward/backward run;
``wait()`` blocks only if that copy is not finished. On CUDA the copies are issued on a side
stream into pinned buffers and the thread waits on an event instead.

Two staging slots are preallocated and pre-faulted once (fresh allocations page-fault and were
~10x slower than reused buffers here). A sender thread erasure-codes a staged slot into its
preallocated parity rows (ISA-L, in place), checksums every fragment and ships them to holders;
only when every holder acknowledged is the step "prepared" (phase one of the commit).

Holder trouble never stops training: a holder that dies or stops answering is left out and the
step's fragments are placed again on the holders that remain; a step that cannot be stored at all
(no holder left, holders full) or whose slot is still busy is skipped and reported
(``snapshot_skipped``), and the next step is tried as usual. Only ``strict`` mode waits instead.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import ray
import torch

from .holder_set import HolderSet
from .isal import RSCodec
from .segments import checksum, write_file
from .layout import SnapshotLayout, capture_rng_states, dumps, tensor_views
from .placement import assignment


class SnapshotError(RuntimeError):
    """A snapshot could not be staged or stored; the message names step, rank and holder."""


@dataclass
class _Slot:
    staging: torch.Tensor
    parity: np.ndarray
    free: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Job:
    step: int
    slot: _Slot
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    copied: threading.Event = field(default_factory=threading.Event)
    cuda_event: Any = None


def _alloc_host(nbytes: int) -> torch.Tensor:
    pin = torch.cuda.is_available()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    buf.zero_()  # pre-fault every page now, not during the first snapshot
    return buf


class SnapshotWriter:
    """One rank's snapshot pipeline: staging (copier thread) → encode + store (sender thread)."""

    def __init__(
        self,
        *,
        rank: int,
        holders: HolderSet,
        home: int,
        k: int,
        m: int,
        put_timeout_s: float = 60.0,
        on_prepared: Callable[[int, int], None] | None = None,
        on_event: Callable[..., None] | None = None,
        strict: bool = False,
    ):
        self.rank, self.holders, self.home, self.k, self.m = rank, holders, home, k, m
        self.put_timeout_s = put_timeout_s
        self.strict = strict
        self.on_event = on_event or (lambda name, **fields: None)
        self.skipped = 0
        self.codec = RSCodec(k, m)
        self.on_prepared = on_prepared
        self.layout: SnapshotLayout | None = None
        self._slots: list[_Slot] = []
        self._next = 0
        self._last_job: _Job | None = None
        self._error: BaseException | None = None
        self._prepared: int | None = None
        self._failed = False
        self._copy_q: queue.Queue[_Job | None] = queue.Queue()
        self._send_q: queue.Queue[_Job | None] = queue.Queue()
        self._stream = None
        self._threads = [
            threading.Thread(target=self._copier, name=f"snapshot-copy-r{rank}", daemon=True),
            threading.Thread(target=self._sender, name=f"snapshot-send-r{rank}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ---- the training loop's side -------------------------------------------------------
    @property
    def prepared_step(self) -> int | None:
        """Newest step whose every fragment was acknowledged by its holders (phase one done)."""
        return self._prepared

    def capture(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> float:
        """Start snapshotting ``tensors`` at ``step``; returns seconds the caller was blocked."""
        t0 = time.perf_counter()
        self._raise_if_failed()
        tensors = {name: t.detach() for name, t in tensors.items()}
        self._ensure_slots(tensors)
        slot = self._slots[self._next]
        if not slot.free.wait(self.put_timeout_s if self.strict else 0):
            if self.strict:
                raise SnapshotError(f"rank {self.rank} step {step}: staging slot still busy after "
                                    f"{self.put_timeout_s:g}s (holders not acknowledging?)")
            self._skip(step, "the previous snapshot is still being stored")
            return time.perf_counter() - t0
        self._next = (self._next + 1) % len(self._slots)
        slot.free.clear()
        full_meta = {"user": meta or {}, "rng": capture_rng_states()}
        job = _Job(step, slot, tensors, full_meta)
        if any(t.is_cuda for t in tensors.values()):
            self._issue_cuda_copies(job)
        self._last_job = job
        self._copy_q.put(job)
        return time.perf_counter() - t0

    def wait(self, timeout_s: float | None = None) -> float:
        """Block until the last capture's copy is done (call before the next optimizer step)."""
        t0 = time.perf_counter()
        job = self._last_job
        if job is not None and not job.copied.wait(self.put_timeout_s if timeout_s is None else timeout_s):
            raise SnapshotError(f"rank {self.rank} step {job.step}: staging copy did not finish in time")
        self._raise_if_failed()
        return time.perf_counter() - t0

    def flush(self, timeout_s: float = 120.0) -> int | None:
        """Wait until every captured step is stored (prepared); returns the newest prepared step."""
        deadline = time.monotonic() + timeout_s
        for slot in self._slots:
            if not slot.free.wait(max(0.0, deadline - time.monotonic())):
                raise SnapshotError(f"rank {self.rank}: snapshots not stored within {timeout_s:g}s")
        self._raise_if_failed()
        return self._prepared

    def close(self) -> None:
        self._copy_q.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def set_holders(self, holders: HolderSet, home: int) -> None:
        """The driver replaced or added holders: later snapshots go to this set."""
        self.holders, self.home = holders, home

    # ---- internals ---------------------------------------------------------------------------
    def _skip(self, step: int, reason: str) -> None:
        self.skipped += 1
        self.on_event("snapshot_skipped", rank=self.rank, step=step, reason=reason)

    def _raise_if_failed(self) -> None:
        if self._error is not None:  # stays failed: later steps are never stored past a failed one
            raise SnapshotError(str(self._error)) from self._error

    def _ensure_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.layout is not None and self.layout.matches(tensors):
            return
        for slot in self._slots:  # shapes changed: let in-flight work finish before reallocating
            slot.free.wait(self.put_timeout_s)
        self.layout = SnapshotLayout.plan(tensors, self.k, self.m)
        self._slots = []
        for _ in range(2):
            slot = _Slot(_alloc_host(self.layout.buffer_len), np.zeros((self.m, self.layout.frag_len), np.uint8))
            slot.parity.fill(1)  # touch the parity pages too
            slot.free.set()
            self._slots.append(slot)

    def _issue_cuda_copies(self, job: _Job) -> None:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        views = tensor_views(job.slot.staging, self.layout)
        with torch.cuda.stream(self._stream):
            for name, t in job.tensors.items():
                views[name].copy_(t, non_blocking=True)
            job.cuda_event = torch.cuda.Event()
            job.cuda_event.record(self._stream)

    @staticmethod
    def _yield_to_training() -> None:
        """Background threads run at lower CPU priority: they fill the loop's idle time, not its cores."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
            pass

    def _copier(self) -> None:
        self._yield_to_training()
        while (job := self._copy_q.get()) is not None:
            try:
                if job.cuda_event is not None:
                    job.cuda_event.synchronize()
                else:
                    views = tensor_views(job.slot.staging, self.layout)
                    for name, t in job.tensors.items():
                        views[name].copy_(t)
            except BaseException as e:  # surfaced at the next wait()/capture()
                self._failed = True
                self._error = SnapshotError(f"rank {self.rank} step {job.step}: staging copy failed: {e}")
                job.slot.free.set()
                job.copied.set()
                continue
            job.tensors = {}
            job.copied.set()
            self._send_q.put(job)
        self._send_q.put(None)

    def _sender(self) -> None:
        self._yield_to_training()
        while (job := self._send_q.get()) is not None:
            try:
                self._encode_and_store(job)
                self._prepared = job.step
                if self.on_prepared is not None:
                    self.on_prepared(self.rank, job.step)
            except SnapshotError as e:  # holders lost or full: this step is skipped, training goes on
                self._skip(job.step, str(e))
            except BaseException as e:  # a bug here, not a holder: surfaced at the next capture()
                self._failed = True
                self._error = SnapshotError(f"rank {self.rank} step {job.step}: storing the snapshot failed: "
                                            f"{type(e).__name__}: {e}")
            finally:
                job.slot.free.set()

    def _encode_and_store(self, job: _Job) -> None:
        layout = self.layout
        data = job.slot.staging.numpy().reshape(self.k, layout.frag_len)
        rows = [data[i] for i in range(self.k)] + [job.slot.parity[i] for i in range(self.m)]
        self.codec.encode(rows[: self.k], rows[self.k :])
        sums = [checksum(r) for r in rows]
        meta_json = dumps({"step": job.step, "rank": self.rank, "layout": layout.to_json(),
                           "checksums": sums, **job.meta})
        store_fragments(self.holders, self.home, job.step, self.rank, meta_json, sums, rows, self.k, self.m,
                        self.put_timeout_s)


def store_fragments(holders: HolderSet, home: int, step: int, rank: int, meta_json: str, sums: list[int],
                    rows: list[np.ndarray], k: int, m: int, timeout_s: float) -> dict[int, list[int]]:
    """Ship fragments to their holders, wait for every ack, then vote; returns the placement used.

    A holder on this node gets its fragments written straight into its shared-memory segments;
    one elsewhere gets them through Ray's object store (verified on arrival). A holder that fails
    (dead, no answer within ``timeout_s``, full) is left out and the placement is made again over
    the rest; SnapshotError when no placement can be stored.
    """
    here = ray.get_runtime_context().get_node_id()
    excluded: set[int] = set()
    errors: list[str] = []
    while True:
        targets = [h for h in holders.writable() if h not in excluded]
        if not targets:
            raise SnapshotError(f"rank {rank} step {step}: no snapshot holder could store it ({'; '.join(errors)})")
        place = assignment(home if home in targets else targets[rank % len(targets)], targets, k, m)
        failed = _store_once(holders, place, here, step, rank, meta_json, sums, rows, timeout_s)
        if not failed:
            return place
        excluded |= set(failed)
        errors += [f"{holders.node_ids[h][:12]}: {why}" for h, why in failed.items()]


def _store_once(holders: HolderSet, place: dict[int, list[int]], here: str, step: int, rank: int, meta_json: str,
                sums: list[int], rows: list[np.ndarray], timeout_s: float) -> dict[int, str]:
    """One placement attempt; {holder: why it failed} (empty when every fragment and a vote landed)."""
    failed: dict[int, str] = {}

    def collect(refs: dict[int, Any], what: str) -> dict[int, Any]:
        ok = {}
        for h, reply in holders.gather(refs, what, timeout_s).items():
            if isinstance(reply, BaseException):
                failed[h] = f"{what}: {type(reply).__name__}: {str(reply).splitlines()[0][:160] if str(reply) else ''}"
            else:
                ok[h] = reply
        return ok

    local = {h: js for h, js in place.items() if holders.node_ids[h] == here}
    nbytes = rows[0].nbytes
    puts = {h: holders.handles[h].put.remote(step, rank, meta_json, sums, {j: rows[j] for j in js})
            for h, js in place.items() if h not in local}
    reserved = collect({h: holders.handles[h].reserve.remote(step, rank, js, nbytes) for h, js in local.items()},
                       "reserve segments")
    adopts = {}
    for h, paths in reserved.items():
        for j, path in paths.items():
            write_file(path, rows[j])
        adopts[h] = holders.handles[h].adopt.remote(step, rank, meta_json, paths)
    collect({**puts, **adopts}, "acknowledge fragments")
    if failed:
        return failed
    voted = collect({h: holders.handles[h].vote.remote(step, rank) for h in place}, "record the vote")
    if not voted:
        return failed or {h: "record the vote: no holder answered" for h in place}
    return {}
