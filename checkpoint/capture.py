"""Capture: snapshot a rank's state into holder shared memory off the training loop, in one pass.

The loop calls ``capture(step, tensors, meta)`` right after ``optimizer.step()`` and ``wait()``
right before the next one. Between the two, parameters and optimizer state do not change
(DataStates-style lazy copy), so a background thread reads them in place while forward/backward
run: the fused pass (:mod:`.fused`) copies each byte once straight into the home holder's mmap'd
shared-memory segments, checksums it while it is in cache and erasure-codes the stripe into the
parity rows. ``wait()`` blocks only if that pass is not finished. A second thread then hands the
segments to their holders (and ships the fragments other nodes keep), and logs the vote: phase
one of the commit. On CUDA the tensors are first copied on a side stream into pinned buffers.

On one node there is nothing for parity to survive (a lost node takes every holder with it), so
no parity is computed, hashed or stored there. Holder trouble never stops training: a holder that
dies or stops answering is left out and the step's fragments are placed again on the holders that
remain; a step that cannot be stored at all (no holder left, holders full) or that arrives while
two earlier ones are still in flight is skipped and reported (``snapshot_skipped``), and the next
step is tried as usual. Only ``strict`` mode waits instead.
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

from .fused import DEFAULT_STRIPE, RowPlan, SegmentMaps, byte_view, fused_pass
from .holder_set import HolderSet
from .isal import RSCodec
from .layout import SnapshotLayout, capture_rng_states, dumps, tensor_views
from .placement import assignment
from .segments import write_file

_IN_FLIGHT = 2


class SnapshotError(RuntimeError):
    """A snapshot could not be staged or stored; the message names step, rank and holder."""


@dataclass
class _Job:
    step: int
    rank: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    passed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    cuda_event: Any = None
    staging: torch.Tensor | None = None
    place: dict[int, list[int]] = field(default_factory=dict)
    rows: list[np.ndarray] = field(default_factory=list)
    reserved: dict[int, dict[int, str]] = field(default_factory=dict)
    sums: list[int] = field(default_factory=list)
    m: int = 0
    staging_rows: dict[int, np.ndarray] | None = None  # rows shipped to other nodes; this job's own


@dataclass
class Traffic:
    """Bytes a writer moved, counted where they are moved (not derived from the layout)."""

    captured: int = 0   # source bytes copied into holder memory (or staging for other nodes)
    parity: int = 0     # parity bytes written
    shipped: int = 0    # bytes sent through Ray to holders on other nodes
    copied_extra: int = 0  # extra same-node copies (a second holder on this node)
    passes: int = 0
    pass_s: float = 0.0

    def total(self) -> int:
        return self.captured + self.parity + self.shipped + self.copied_extra


class SnapshotWriter:
    """One rank's snapshot pipeline: fused pass (one thread) → hand over, ship, vote (another)."""

    def __init__(self, *, rank: int, holders: HolderSet, home: int, k: int, m: int, put_timeout_s: float = 60.0,
                 on_prepared: Callable[[int, int], None] | None = None, on_event: Callable[..., None] | None = None,
                 strict: bool = False, stripe_bytes: int = DEFAULT_STRIPE):
        self.rank, self.holders, self.home, self.k, self.m = rank, holders, home, k, m
        self.put_timeout_s, self.strict, self.stripe_bytes = put_timeout_s, strict, stripe_bytes
        self.on_event = on_event or (lambda name, **fields: None)
        self.on_prepared = on_prepared
        self.skipped = 0
        self.traffic = Traffic()
        self.layout: SnapshotLayout | None = None
        self._plan: RowPlan | None = None
        self._codecs: dict[int, RSCodec] = {}
        self._maps = SegmentMaps()
        # Sets of rows for fragments shipped to other nodes, one set per job in flight: a set goes back
        # only when its job's fragments are handed over, so the next pass never overwrites bytes still
        # waiting to be shipped.
        self._spare_rows: list[dict[int, np.ndarray]] = []
        self._rows_lock = threading.Lock()
        self._cuda_staging: list[torch.Tensor] = []
        self._stream = None
        self._jobs: list[_Job] = []
        self._last_job: _Job | None = None
        self._error: BaseException | None = None
        self._prepared: int | None = None
        self._lock = threading.Lock()  # the pass and the hand-over of one job never interleave with a repair
        self._pass_q: queue.Queue[_Job | None] = queue.Queue()
        self._send_q: queue.Queue[_Job | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._passer, name=f"snapshot-pass-r{rank}", daemon=True),
                         threading.Thread(target=self._sender, name=f"snapshot-send-r{rank}", daemon=True)]
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
        self._jobs = [j for j in self._jobs if not j.done.is_set()]
        if len(self._jobs) >= _IN_FLIGHT:
            if not self.strict:
                self._skip(step, f"{len(self._jobs)} earlier snapshots are still being stored")
                return time.perf_counter() - t0
            if not self._jobs[0].done.wait(self.put_timeout_s):
                raise SnapshotError(f"rank {self.rank} step {step}: earlier snapshots not stored after "
                                    f"{self.put_timeout_s:g}s (holders not acknowledging?)")
        job = _Job(step, self.rank, {n: t.detach() for n, t in tensors.items()},
                   {"user": meta or {}, "rng": capture_rng_states()})
        if any(t.is_cuda for t in job.tensors.values()):
            self._issue_cuda_copies(job)
        self._jobs.append(job)
        self._last_job = job
        self._pass_q.put(job)
        return time.perf_counter() - t0

    def wait(self, timeout_s: float | None = None) -> float:
        """Block until the last capture's pass has read every source byte (call before the next optimizer step)."""
        t0 = time.perf_counter()
        job = self._last_job
        if job is not None and not job.passed.wait(self.put_timeout_s if timeout_s is None else timeout_s):
            raise SnapshotError(f"rank {self.rank} step {job.step}: the capture pass did not finish in time")
        self._raise_if_failed()
        return time.perf_counter() - t0

    def flush(self, timeout_s: float = 120.0) -> int | None:
        """Wait until every captured step is stored (prepared) or skipped; returns the newest prepared step."""
        deadline = time.monotonic() + timeout_s
        for job in list(self._jobs):
            if not job.done.wait(max(0.0, deadline - time.monotonic())):
                raise SnapshotError(f"rank {self.rank}: snapshots not stored within {timeout_s:g}s")
        self._raise_if_failed()
        return self._prepared

    def store_now(self, step: int, as_rank: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Store ``tensors`` as rank ``as_rank``'s snapshot of ``step``, synchronously (a replica repairing
        a stripe its lost peer captured but never stored). Raises SnapshotError if no holder takes it."""
        self.flush(self.put_timeout_s)
        job = _Job(step, as_rank, {n: t.detach() for n, t in tensors.items()},
                   {"user": meta, "rng": capture_rng_states()})
        if any(t.is_cuda for t in job.tensors.values()):
            job.tensors = {n: t.cpu() for n, t in job.tensors.items()}
        with self._lock:
            self._pass(job)
            self._hand_over(job)

    def set_holders(self, holders: HolderSet, home: int) -> None:
        """The driver replaced or added holders: later snapshots go to this set."""
        self.holders, self.home = holders, home

    @property
    def staging_pinned(self) -> bool | None:
        """Whether the CUDA staging buffers are pinned host memory (None: no CUDA state captured yet)."""
        return all(t.is_pinned() for t in self._cuda_staging) if self._cuda_staging else None

    def close(self) -> None:
        self._pass_q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._maps.close()

    # ---- internals ---------------------------------------------------------------------------
    def _skip(self, step: int, reason: str) -> None:
        self.skipped += 1
        self.on_event("snapshot_skipped", rank=self.rank, step=step, reason=reason)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise SnapshotError(str(self._error)) from self._error

    def _codec(self, m: int) -> RSCodec:
        if m not in self._codecs:
            self._codecs[m] = RSCodec(self.k, m)
        return self._codecs[m]

    def _effective_m(self) -> int:
        """Parity only where it can survive something: holders on at least two nodes."""
        nodes = {self.holders.node_ids[h] for h in self.holders.writable()}
        return self.m if len(nodes) > 1 else 0

    def _issue_cuda_copies(self, job: _Job) -> None:
        layout = self._layout_for(job.tensors)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if len(self._cuda_staging) < _IN_FLIGHT or self._cuda_staging[0].numel() < layout.buffer_len:
            self._cuda_staging = [torch.zeros(layout.buffer_len, dtype=torch.uint8, pin_memory=True)
                                  for _ in range(_IN_FLIGHT)]
        job.staging = self._cuda_staging[job.step % _IN_FLIGHT]
        self._stream.wait_stream(torch.cuda.current_stream())
        views = tensor_views(job.staging, layout)
        with torch.cuda.stream(self._stream):
            for name, t in job.tensors.items():
                views[name].copy_(t, non_blocking=True)
            job.cuda_event = torch.cuda.Event()
            job.cuda_event.record(self._stream)

    def _layout_for(self, tensors: dict[str, torch.Tensor]) -> SnapshotLayout:
        if self.layout is None or not self.layout.matches(tensors):
            self.layout = SnapshotLayout.plan(tensors, self.k, self.m)
            self._plan = RowPlan(self.layout, self.stripe_bytes)
        return self.layout

    @staticmethod
    def _yield_to_training() -> None:
        """Background threads run at lower CPU priority: they fill the loop's idle time, not its cores."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
            pass

    def _passer(self) -> None:
        self._yield_to_training()
        while (job := self._pass_q.get()) is not None:
            try:
                with self._lock:
                    self._pass(job)
            except SnapshotError as e:  # holders lost or full while reserving: skip this step
                self._skip(job.step, str(e))
                job.passed.set()
                job.done.set()
                continue
            except BaseException as e:  # a bug here, not a holder: surfaced at the next capture()/wait()
                self._error = SnapshotError(f"rank {self.rank} step {job.step}: the capture pass failed: "
                                            f"{type(e).__name__}: {e}")
                job.passed.set()
                job.done.set()
                continue
            self._send_q.put(job)
        self._send_q.put(None)

    def _sender(self) -> None:
        self._yield_to_training()
        while (job := self._send_q.get()) is not None:
            try:
                with self._lock:
                    self._hand_over(job)
                self._prepared = job.step if self._prepared is None else max(self._prepared, job.step)
                if self.on_prepared is not None:
                    self.on_prepared(job.rank, job.step)
            except SnapshotError as e:
                self._skip(job.step, str(e))
            except BaseException as e:
                self._error = SnapshotError(f"rank {self.rank} step {job.step}: storing the snapshot failed: "
                                            f"{type(e).__name__}: {e}")
            finally:
                job.tensors = {}
                if job.staging_rows is not None:
                    with self._rows_lock:
                        self._spare_rows.append(job.staging_rows)
                    job.staging_rows = None
                job.done.set()

    def _pass(self, job: _Job) -> None:
        """Reserve the destinations, then copy + hash + encode in one pass (sets ``job.passed``)."""
        t0 = time.perf_counter()
        try:
            if job.cuda_event is not None:
                job.cuda_event.synchronize()
                layout = self.layout
                sources = [job.staging.numpy()[s.offset:s.offset + s.nbytes] for s in layout.tensors]
            else:
                layout = self._layout_for(job.tensors)
                sources = [byte_view(job.tensors[s.name]) for s in layout.tensors]
            job.m = self._effective_m()
            excluded: dict[int, str] = {}
            while True:  # a holder that cannot reserve is left out and the step placed on the others
                writable = [h for h in self.holders.writable() if h not in excluded]
                if not writable:
                    raise SnapshotError(f"rank {job.rank} step {job.step}: no snapshot holder could store it "
                                        f"({'; '.join(excluded.values()) or 'none writable'})")
                job.place = assignment(self.home if self.home in writable else writable[job.rank % len(writable)],
                                       writable, self.k, job.m)
                failed = self._reserve(job, layout)
                if not failed:
                    break
                excluded.update(failed)
            job.rows = self._destinations(job, layout)
            job.sums = fused_pass(self._plan, sources, job.rows[: self.k], job.rows[self.k:],
                                  self._codec(job.m) if job.m else None)
        finally:
            job.passed.set()
        self.traffic.captured += layout.nbytes
        self.traffic.parity += job.m * layout.frag_len
        self.traffic.passes += 1
        self.traffic.pass_s += time.perf_counter() - t0

    def _reserve(self, job: _Job, layout: SnapshotLayout) -> dict[int, str]:
        """Segments on the same-node holders of ``job.place``; {holder: why} for those that refused."""
        here = ray.get_runtime_context().get_node_id()
        local = {h: js for h, js in job.place.items() if self.holders.node_ids[h] == here}
        refs = {h: self.holders.handles[h].reserve.remote(job.step, job.rank, js, layout.frag_len)
                for h, js in local.items()}
        job.reserved, failed = {}, {}
        for h, reply in self.holders.gather(refs, "reserve segments", self.put_timeout_s).items():
            if isinstance(reply, BaseException):
                failed[h] = f"{self.holders.node_ids[h][:12]}: reserve segments: {type(reply).__name__}: {reply}"
            else:
                job.reserved[h] = reply
        return failed

    def _destinations(self, job: _Job, layout: SnapshotLayout) -> list[np.ndarray]:
        """One buffer per fragment: a same-node holder's segment (mapped), else a reused staging row."""
        rows: list[np.ndarray] = []
        for j in range(self.k + job.m):
            path = next((paths[j] for paths in job.reserved.values() if j in paths), None)
            if path is not None:
                rows.append(self._maps.view(path, layout.frag_len))
            else:
                if job.staging_rows is None:
                    with self._rows_lock:
                        job.staging_rows = self._spare_rows.pop() if self._spare_rows else {}
                buf = job.staging_rows.get(j)
                if buf is None or buf.nbytes != layout.frag_len:
                    buf = job.staging_rows[j] = np.zeros(layout.frag_len, np.uint8)
                rows.append(buf)
        return rows

    def _hand_over(self, job: _Job) -> None:
        """Adopt reserved segments, ship what other nodes keep, vote; re-place the step if a holder fails."""
        layout = self.layout
        meta_json = dumps({"step": job.step, "rank": job.rank, "layout": _with_m(layout, job.m).to_json(),
                           "checksums": job.sums, **job.meta})
        failed: dict[int, str] = {}
        first_owner = {j: next(h for h, paths in job.reserved.items() if j in paths)
                       for j in range(self.k + job.m) if any(j in p for p in job.reserved.values())}
        refs = {}
        for h, paths in job.reserved.items():
            for j, path in paths.items():
                if first_owner[j] != h:  # a second holder on this node (simulated nodes): copy the bytes
                    write_file(path, job.rows[j])
                    self.traffic.copied_extra += layout.frag_len
            refs[h] = self.holders.handles[h].adopt.remote(job.step, job.rank, meta_json, paths)
        for h, js in job.place.items():
            if h not in job.reserved:
                refs[h] = self.holders.handles[h].put.remote(job.step, job.rank, meta_json, job.sums,
                                                             {j: job.rows[j] for j in js})
                self.traffic.shipped += len(js) * layout.frag_len
        for h, reply in self.holders.gather(refs, "acknowledge fragments", self.put_timeout_s).items():
            if isinstance(reply, BaseException):
                failed[h] = f"{type(reply).__name__}: {str(reply).splitlines()[0][:160] if str(reply) else ''}"
        if not failed:
            votes = self.holders.gather({h: self.holders.handles[h].vote.remote(job.step, job.rank)
                                         for h in job.place}, "record the vote", self.put_timeout_s)
            if any(not isinstance(v, BaseException) for v in votes.values()):
                self._maps.prune()
                return
        # Some holder failed: place the whole step again over the holders left (the bytes are still mapped).
        store_fragments(self.holders, self.home, job.step, job.rank, meta_json, job.sums, job.rows, self.k, job.m,
                        self.put_timeout_s, exclude=set(failed))
        self._maps.prune()


def _with_m(layout: SnapshotLayout, m: int) -> SnapshotLayout:
    """The layout as stored: its parity count is what this step really has (0 on one node)."""
    return SnapshotLayout(layout.tensors, layout.nbytes, layout.k, m, layout.frag_len)


def store_fragments(holders: HolderSet, home: int, step: int, rank: int, meta_json: str, sums: list[int],
                    rows: list[np.ndarray], k: int, m: int, timeout_s: float,
                    exclude: set[int] | None = None) -> dict[int, list[int]]:
    """Ship fragments to their holders, wait for every ack, then vote; returns the placement used.

    A holder on this node gets its fragments written straight into its shared-memory segments;
    one elsewhere gets them through Ray's object store. A holder that fails (dead, no answer within
    ``timeout_s``, full) is left out and the placement is made again over the rest; SnapshotError
    when no placement can be stored.
    """
    here = ray.get_runtime_context().get_node_id()
    excluded: set[int] = set(exclude or ())
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
