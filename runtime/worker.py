"""One rank: a Ray actor that forms the process group, builds the model and runs the step loop.

The actor is threaded (``max_concurrency``) so the controller's health polls (``progress``)
are answered while ``train`` runs. Everything a step does is a function of (seed, step, rank):
the batch, and the RNG that dropout draws from (reseeded every step), so restoring the engine's
state at a step resumes bitwise where an uninterrupted run would be.

A worker outlives its process group: when a peer dies, ``train`` returns "interrupted" instead
of failing, and the controller can form a new group with a replacement rank (``setup`` again)
while this process keeps its model, engine and imports. A worker may also start as a *spare*
(no rank yet, model built) and be given a rank when one is lost.

Each rank writes its own log, ``<run_dir>/logs/rank-<r>.log`` (stdout, stderr, Python
tracebacks and native crash dumps), so a failure can be read after the process is gone.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from trainmem.checkpoint import Candidate, Location, RankSnapshots
from trainmem.eager_torch import defer_dynamo_import
from trainmem.memory_services import maybe_init_memory
from trainmem.offload import ActivationPolicy

from .checkpointing import (CheckpointCallback, DurableCheckpoints, Snapshots, open_reader, snapshot_meta,
                            walk_restore)
from .config import JobSpec
from .data import open_corpus
from .engines import build_engine
from .failure import InjectedFailure
from .models import build
from .rendezvous import RendezvousListener, init_group, is_collective_failure
from .runlog import SinkClient
from .telemetry import GpuTelemetry

STOP_KEY = "trainmem/stop-after-step"
_HOLD_LIMIT_S = 60.0  # longest a fault drill may hold a rank (its driver may have died)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def params_sha256(model: torch.nn.Module) -> str:
    return state_sha256(model.state_dict())


def rank_log_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank-{rank}.log"


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"


def _send_output_to(path: Path, header: str) -> None:
    """Point this process's stdout/stderr (and native crash dumps) at ``path``, appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"\n==== {header} ====\n".encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable(file=sys.stderr, all_threads=True)


@ray.remote(max_concurrency=4)
class Worker:
    def __init__(self, spec: JobSpec, world: int, inject: InjectedFailure | None, rank: int | None = None,
                 attempt: int = 0):
        self.spec, self.world, self.inject_plan = spec, world, inject
        self.rank: int | None = None
        self.attempt = attempt
        self._lock = threading.Lock()
        self._pending_metrics: list[dict[str, Any]] = []
        self._pending_events: list[dict[str, Any]] = []
        self._step_done = 0
        self._phase, self._phase_since = "starting", time.time()
        self._interrupt = threading.Event()
        self._stop_requested = threading.Event()
        self._hold_before: int | None = None  # a fault drill holds this rank before that step
        self.device = torch.device("cpu")
        self.log = SinkClient(spec.run_dir)  # the run log on the driver's node; run_dir may not be shared
        self.location = Location(spec.checkpoint_uri, spec.checkpoint.storage)
        self.snapshots: RankSnapshots | None = None
        self.engine = None
        self.model = None
        self.callbacks: list[CheckpointCallback] = []
        self._listener: RendezvousListener | None = None
        self._state_step = 0  # the step the engine's state is at (ahead of _step_done inside a step's end)
        self.telemetry: GpuTelemetry | None = None
        if rank is None:
            _send_output_to(Path(spec.run_dir) / "logs" / f"spare-{os.getpid()}.log",
                            f"spare worker, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        else:
            self.assign(rank, attempt)

    # ---- answered on a separate thread while train() runs -------------------------------
    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            metrics, self._pending_metrics = self._pending_metrics, []
            events, self._pending_events = self._pending_events, []
            return {"rank": self.rank, "step": self._step_done, "phase": self._phase,
                    "phase_s": time.time() - self._phase_since, "metrics": metrics, "events": events}

    def dump_stacks(self) -> str:
        """Every thread's Python stack, written to this rank's log; returns the text (for a hung rank)."""
        frames = sys._current_frames()
        names = {t.ident: t.name for t in threading.enumerate()}
        text = "".join(f"--- thread {names.get(ident, ident)} ---\n" + "".join(traceback.format_stack(frame))
                       for ident, frame in frames.items())
        print(f"==== stacks at {time.strftime('%H:%M:%S')} ====\n{text}", flush=True)
        return text

    def update_snapshot_plan(self, plan: dict[str, Any]) -> None:
        """Holders were replaced or added; the next snapshot uses them."""
        if self.snapshots is not None:
            self.snapshots.update(plan)

    def interrupt(self) -> None:
        """A peer is gone: leave the step loop at the next boundary (or the next failing collective)."""
        self._interrupt.set()

    def request_stop(self) -> None:
        """Preemption: rank 0 picks the next step boundary; every rank saves there and returns."""
        self._stop_requested.set()

    def hold_before(self, step: int) -> int:
        """Stop at the boundary before ``step`` (or the next one, if that is passed) until
        :meth:`release_hold`. For fault drills: `trainmem chaos` holds rank 0 (so every rank, at its
        next collective) so that a fault lands at the step it drew, not wherever a fast job has got to.
        Returns the last finished step."""
        with self._lock:
            self._hold_before = step
            return self._step_done

    def release_hold(self, then_before: int | None = None) -> None:
        """Let the held rank go on; ``then_before`` arms the next hold in the same call (arming it by a
        later call races a fast job past that step)."""
        with self._lock:
            self._hold_before = then_before

    def _held_at(self, step: int) -> bool:
        with self._lock:
            return self._hold_before is not None and step >= self._hold_before

    def _maybe_hold(self, step: int) -> None:
        if not self._held_at(step):
            return
        self._enter("held")
        deadline = time.monotonic() + _HOLD_LIMIT_S  # a drill whose driver vanished must not wedge the job
        while self._held_at(step):
            if self._interrupt.is_set() or time.monotonic() > deadline:
                with self._lock:
                    self._hold_before = None
                return
            time.sleep(0.05)

    def _event(self, name: str, **fields: Any) -> None:
        """An event for events.jsonl, delivered through the controller's next health poll."""
        with self._lock:
            self._pending_events.append({"event": name, "time": time.time(), **fields})

    def _enter(self, phase: str) -> None:
        with self._lock:
            self._phase, self._phase_since = phase, time.time()

    # ---- set-up -----------------------------------------------------------------------------
    def assign(self, rank: int, attempt: int) -> int:
        """Become rank ``rank`` (a spare learns its rank here); returns the pid."""
        self.rank, self.attempt = rank, attempt
        self.inject = self.inject_plan if self.inject_plan is not None and self.inject_plan.rank == rank else None
        _send_output_to(rank_log_path(self.spec.run_dir, rank), f"rank {rank} of {self.world}, attempt {attempt}, "
                        f"pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
        return os.getpid()

    def prewarm(self) -> int:
        """Everything that needs no process group: the corpus and the model (a spare does this early)."""
        if self.model is not None:
            return os.getpid()
        spec = self.spec
        defer_dynamo_import()  # a rank (or a spare taking one over) starts ~1 CPU-s sooner; eager only
        torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
        if spec.cluster.gpus_per_worker > 0 and torch.cuda.is_available():
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        self.corpus = open_corpus(spec.data)
        if self.corpus.max_token >= spec.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={spec.model.vocab_size} but the corpus has token id {self.corpus.max_token} "
                f"(fix: set model.vocab_size >= {self.corpus.max_token + 1})"
            )
        self.model = build(spec.model, seed=spec.train.seed).to(self.device)
        self.pipelined = spec.pipeline.stages > 1
        return os.getpid()

    def reserve_rendezvous(self) -> tuple[str, int]:
        """Rank 0 binds the rendezvous socket on its node's address and holds it until setup."""
        self._listener = RendezvousListener(ray.util.get_node_ip_address())
        return self._listener.ip, self._listener.port

    def setup(self, ip: str, port: int, restore: dict[str, Any], attempt: int | None = None) -> dict[str, Any]:
        """Join a (new) process group, build what is missing, restore the newest state every rank can read.

        ``restore``: {"candidates": [Candidate JSON, newest first], "snapshots": plan or None}.
        Returns {"step", "tier", "rejected", "rejoined"} (step 0: fresh start; None: nothing restorable).
        """
        try:
            return self._setup(ip, port, restore, attempt)
        except BaseException:
            traceback.print_exc()
            raise

    def _setup(self, ip: str, port: int, restore: dict[str, Any], attempt: int | None) -> dict[str, Any]:
        self._enter("setup")
        rejoined = self.engine is not None
        if attempt is not None:
            self.attempt = attempt
        self._interrupt.clear()
        self._stop_requested.clear()
        self._leave_group()
        self.prewarm()
        spec = self.spec
        use_cuda = self.device.type == "cuda"
        backend = spec.cluster.backend if spec.cluster.backend != "auto" else ("nccl" if use_cuda else "gloo")
        self.store = init_group(backend=backend, ip=ip, port=port, rank=self.rank, world=self.world,
                                timeout_s=spec.cluster.collective_timeout_s, listener=self._listener)
        self._listener = None
        if self.engine is not None:
            self.engine.on_new_group()
        else:
            self._enter("planning")
            self.engine = build_engine(spec, self.model, self._batch(1, warmup=True), self.device, events=self._event)
            policy = getattr(self.engine, "policy", None)
            if isinstance(policy, ActivationPolicy) and self.rank == 0:
                self._event("activation_plan", attempt=self.attempt, **policy.plan_.to_dict())
            mesh = getattr(self.engine, "mesh", None)
            if mesh is not None and mesh.replica == 0:  # a pipeline: each stage rank plans and measures its own
                if policy is not None:
                    self._event("activation_plan", attempt=self.attempt, rank=self.rank, **policy.plan_.to_dict())
                if self.engine.measured:
                    self._event("offload_measured", attempt=self.attempt, rank=self.rank, **self.engine.measured)
        if self.telemetry is None:
            self.telemetry = GpuTelemetry(self._event, announce=self.rank == 0 and self.attempt == 0)
        self._close_callbacks()
        self.callbacks = self._checkpoint_callbacks(restore.get("snapshots"))
        self._enter("restore")
        candidates = [Candidate.from_json(c) for c in restore["candidates"]]
        result = walk_restore(self.engine, candidates,
                              lambda c: open_reader(c, self.location, self.snapshots), self.rank)
        if result["step"] is not None and (loaded := maybe_init_memory(self.model, spec.model, result["step"])):
            self._event("memory_init", rank=self.rank, step=result["step"], **loaded)  # --init-memory-from
        with self._lock:
            self._step_done = result["step"] or 0
        self._state_step = self._step_done
        return {**result, "rejoined": rejoined, "pid": os.getpid()}

    def _checkpoint_callbacks(self, snapshot_plan: dict[str, Any] | None) -> list[CheckpointCallback]:
        spec, seed = self.spec, self.spec.train.seed
        savers = self._group_savers()
        shared = len(set(savers)) == 1
        root = self.location if shared else self.location.child(f"rank-{self.rank}")
        self.durable = DurableCheckpoints(root, every=spec.checkpoint.every_steps, keep=spec.checkpoint.keep,
                                          saves=savers[self.rank] == self.rank, world=self.world, seed=seed)
        callbacks: list[CheckpointCallback] = [self.durable]
        if snapshot_plan is not None:
            self.snapshots = RankSnapshots(snapshot_plan, self.rank, self.world, on_event=self._event)
            callbacks.append(Snapshots(self.snapshots, world=self.world, seed=seed))
        return callbacks

    def _group_savers(self) -> list[int]:
        """For each rank, the lowest rank holding the same state (exchanged through the rendezvous store)."""
        self.store.set(f"replica-key/{self.rank}", self.engine.replica_group_key)
        keys = [self.store.get(f"replica-key/{r}").decode() for r in range(self.world)]
        return [keys.index(k) for k in keys]

    def _close_callbacks(self) -> None:
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception:  # an old writer whose holders are gone: nothing to save any more
                traceback.print_exc()
        self.callbacks, self.snapshots = [], None

    def _leave_group(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a group whose peers died: tearing it down may fail, it is dropped anyway
                traceback.print_exc()

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to the last step; {"interrupted": True, ...} when a peer was lost (this rank is healthy)."""
        try:
            return self._train()
        except BaseException as e:
            if self._interrupt.is_set() or is_collective_failure(e):
                print(f"rank {self.rank}: left the step loop at step {self._step_done} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})", flush=True)
                return self._paused()
            traceback.print_exc()
            raise

    def _paused(self) -> dict[str, Any]:
        if self.snapshots is not None:
            try:
                self.snapshots.writer.flush(timeout_s=self.spec.checkpoint.holder_timeout_s)
            except Exception:  # a snapshot that cannot be stored now is simply not there
                traceback.print_exc()
        self._leave_group()
        self._enter("paused")
        return {"rank": self.rank, "interrupted": True, "steps": self._step_done, "state_step": self._state_step,
                "pid": os.getpid()}

    def repair_snapshot(self, step: int, ranks: list[int]) -> None:
        """Store lost replicas' stripes of ``step`` from this rank's own state (a paused healthy replica)."""
        if self._state_step != step:
            raise ValueError(f"rank {self.rank} holds the state of step {self._state_step}, not {step}")
        tensors, meta = self.engine.state_for_checkpoint()
        self.snapshots.repair(step, ranks, tensors, snapshot_meta(meta, self.world, self.spec.train.seed))

    def _train(self) -> dict[str, Any]:
        spec = self.spec
        start = self._step_done
        tokens_per_step = spec.train.batch_size * spec.model.seq_len * self.engine.data_rank_world[1]
        stop_after = None
        for step in range(start + 1, spec.train.steps + 1):
            self._maybe_hold(step)
            if self._interrupt.is_set():
                return self._paused()
            t0 = time.perf_counter()
            self._maybe_inject(step)
            loss = self._train_step(step)
            for cb in self.callbacks:
                cb.after_optimizer_step(step, self.engine)
            dt = time.perf_counter() - t0
            peak, peak_kind = _peak_memory(self.device)
            record = {
                "step": step, "loss": loss, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                "peak_mem_bytes": peak, "peak_mem_kind": peak_kind, **self.engine.last_stats,
                "attempt": self.attempt, "time": time.time(), **self.telemetry.sample(),
            }
            if self.snapshots is not None:
                record["snapshots_skipped"] = self.snapshots.writer.skipped
            if self.rank == 0:  # sent now, not at the next poll, so a crash loses no finished step's line
                self.log.metric(record)
            with self._lock:
                self._pending_metrics.append(record)
                self._step_done = step
            stop_after = self._stop_step(step) if stop_after is None else stop_after
            if stop_after is not None and step >= stop_after:
                return self._preempted(step)
        self._enter("finished")
        result = {"rank": self.rank, "steps": self._step_done}
        if self.snapshots is not None:
            self.snapshots.writer.flush(self.spec.checkpoint.holder_timeout_s)
            result["snapshot_traffic"] = dataclasses.asdict(self.snapshots.writer.traffic)
        state = self.engine.full_state_dict()
        if self.rank == 0:
            result["params_sha256"] = state_sha256(state)
        dist.barrier()
        return result

    def _stop_step(self, step: int) -> int | None:
        """The step every rank stops after, once rank 0 was asked to stop (agreed through the store).

        Rank 0 names the step after the one it just finished: no rank can have finished that one
        yet, since each step's collectives need rank 0.
        """
        if self.rank == 0 and self._stop_requested.is_set() and not self.store.check([STOP_KEY]):
            self.store.set(STOP_KEY, str(step + 1))
        if self.store.check([STOP_KEY]):
            return int(self.store.get(STOP_KEY))
        return None

    def _preempted(self, step: int) -> dict[str, Any]:
        """Save this step durably (one writer per replica group), then leave."""
        self._enter("preempt_save")
        if self.snapshots is not None:
            self.snapshots.writer.flush(timeout_s=self.spec.checkpoint.holder_timeout_s)
        self.durable.save_now(step, self.engine)
        self._enter("preempted")
        return {"rank": self.rank, "steps": step, "preempted": True}

    def _batch(self, step: int, warmup: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        data_rank, data_world = (0, 1) if self.pipelined else (self.rank, self.world)
        if not warmup:
            data_rank, data_world = self.engine.data_rank_world
        x, y = self.corpus.batch(
            seed=self.spec.train.seed, step=step, rank=data_rank, world=data_world,
            batch_size=self.spec.train.batch_size, seq_len=self.spec.model.seq_len,
        )
        return x.to(self.device), y.to(self.device)

    def _train_step(self, step: int) -> float:
        spec = self.spec
        self._enter("data")
        torch.manual_seed(step_seed(spec.train.seed, step, self.rank))
        x, y = self._batch(step)
        self._enter("forward_backward")
        loss = self.engine.forward_backward(x, y)
        self._enter("optimizer")
        if spec.train.grad_clip > 0:
            self.engine.clip(spec.train.grad_clip)
        for cb in self.callbacks:
            cb.before_optimizer_step()
        self.engine.optimizer_step()
        self._state_step = step
        self._enter("checkpoint")
        return loss

    def _maybe_inject(self, step: int) -> None:
        if self.inject is None or step != self.inject.step or self.attempt != 0:
            return
        # Sent (and waited for) now: the process may be gone before the next health poll.
        self.log.event("failure_injected", rank=self.rank, step=step, kind=self.inject.kind, pid=os.getpid())
        if self.inject.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        self._enter("injected_hang")
        threading.Event().wait()  # a hang: never returns; the controller must notice

    def shutdown(self) -> None:
        self._close_callbacks()
        self._leave_group()
