"""One rank: a Ray actor that forms the process group, builds the model and runs the step loop.

The actor is threaded (``max_concurrency``) so the controller's health polls (``progress``)
are answered while ``train`` runs. Everything a step does is a function of (seed, step, rank):
the batch, and the RNG that dropout draws from (reseeded every step), so restoring
model + optimizer + step resumes bitwise where an uninterrupted run would be.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from trainmem.checkpoint import DurableStore, RankSnapshots
from trainmem.checkpoint.state import flatten_training_state, restore_training_state
from trainmem.memory_services import maybe_init_memory

from .config import JobSpec
from .data import open_corpus
from .failure import InjectedFailure
from .engines import build_engine
from .models import build
from .optim import build_optimizer
from .runlog import RunLog


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss"


@ray.remote(max_concurrency=4)
class Worker:
    def __init__(self, spec: JobSpec, rank: int, world: int, attempt: int, inject: InjectedFailure | None):
        self.spec, self.rank, self.world, self.attempt = spec, rank, world, attempt
        self.inject = inject if inject is not None and inject.rank == rank else None
        self._lock = threading.Lock()
        self._pending_metrics: list[dict[str, Any]] = []
        self._step_done = 0
        self._phase, self._phase_since = "starting", time.time()
        self.device = torch.device("cpu")
        self.log = RunLog(spec.run_dir)

    # ---- answered on a separate thread while train() runs -------------------------------
    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            metrics, self._pending_metrics = self._pending_metrics, []
            return {
                "rank": self.rank,
                "step": self._step_done,
                "phase": self._phase,
                "phase_s": time.time() - self._phase_since,
                "metrics": metrics,
            }

    def _enter(self, phase: str) -> None:
        with self._lock:
            self._phase, self._phase_since = phase, time.time()

    # ---- set-up -----------------------------------------------------------------------------
    def reserve_master_address(self) -> tuple[str, int]:
        """Rank 0 picks the rendezvous address: its node IP and a port free right now."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group, build model/optimizer, restore the latest checkpoint.

        Returns the step training resumes after (0 for a fresh start).
        """
        self._enter("setup")
        spec = self.spec
        torch.set_num_threads(max(1, int(spec.cluster.cpus_per_worker)))
        use_cuda = spec.cluster.gpus_per_worker > 0 and torch.cuda.is_available()
        backend = spec.cluster.backend if spec.cluster.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if use_cuda:
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=spec.cluster.collective_timeout_s),
        )
        self.corpus = open_corpus(spec.data)
        if self.corpus.max_token >= spec.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={spec.model.vocab_size} but the corpus has token id {self.corpus.max_token} "
                f"(fix: set model.vocab_size >= {self.corpus.max_token + 1})"
            )
        self.model = build(spec.model, seed=spec.train.seed).to(self.device)
        self.pipelined = spec.pipeline.stages > 1
        # Pipeline ranks own different parameters and optimizer state: each keeps its own store.
        root = spec.checkpoint_dir / f"rank-{self.rank}" if self.pipelined else spec.checkpoint_dir
        self.store = DurableStore(root, keep=spec.checkpoint.keep)
        # checkpoint seam: in-memory snapshots (plan written by the controller before this attempt)
        self.snapshots = (RankSnapshots.open(spec.checkpoint_dir, self.rank, self.world)
                          if spec.checkpoint.snapshot_every else None)
        start = self._restore()  # checkpoint seam: restore
        self._enter("planning")
        self.engine = build_engine(spec, self.model, self.device, self._batch(start + 1))
        if self.engine.policy is not None and self.rank == 0:
            self.log.event("activation_plan", attempt=self.attempt, **self.engine.policy.plan_.to_dict())
        self.optimizer = build_optimizer(self.model, self.engine.parameters(), spec.train)
        if start:
            restore_training_state(self.model, self.optimizer, self._restored.tensors, self._restored.meta)
        if loaded := maybe_init_memory(self.model, spec.model, start):  # --init-memory-from
            self.log.event("memory_init", rank=self.rank, step=start, **loaded)
        with self._lock:
            self._step_done = start
        return start

    def _restore(self) -> int:
        # checkpoint seam: restore — the newest durable step every rank has (DDP replicas share
        # one store; pipeline ranks agree on the minimum, which every rank still keeps).
        # With snapshots, the controller's plan names the tier: memory or flush are read here.
        if self.snapshots is not None:
            loaded = self.snapshots.load()
            if loaded is not None:
                self._restored = loaded
                return loaded.step
        latest = torch.tensor([self.store.latest_step() or 0])
        dist.all_reduce(latest, op=dist.ReduceOp.MIN)
        step = int(latest.item())
        self._restored = self.store.load(step) if step else None
        return step

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        spec = self.spec
        start = self._step_done
        tokens_per_step = spec.train.batch_size * spec.model.seq_len * self.engine.data_rank_world[1]
        for step in range(start + 1, spec.train.steps + 1):
            t0 = time.perf_counter()
            self._maybe_inject(step)
            loss = self._train_step(step)
            self._after_step(step)  # checkpoint seam: after the optimizer step
            dt = time.perf_counter() - t0
            peak, peak_kind = _peak_memory(self.device)
            record = {
                "step": step,
                "loss": loss,
                "step_time_s": dt,
                "tokens_per_s": tokens_per_step / dt,
                "peak_mem_bytes": peak,
                "peak_mem_kind": peak_kind,
                **self.engine.last_stats,
                "attempt": self.attempt,
                "time": time.time(),
            }
            if self.rank == 0:  # written here, not by the driver, so a crash loses no finished step's line
                self.log.metric(record)
            with self._lock:
                self._pending_metrics.append(record)
                self._step_done = step
        self._enter("finished")
        result = {"rank": self.rank, "steps": self._step_done}
        self.engine.gather_to_rank0()
        if self.rank == 0:
            result["params_sha256"] = params_sha256(self.model)
        dist.barrier()
        return result

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        data_rank, data_world = (0, 1) if self.pipelined else (self.rank, self.world)
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
        if self.snapshots is not None:  # checkpoint seam: the last snapshot's copy must be done
            self.snapshots.wait()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _after_step(self, step: int) -> None:
        # checkpoint seam: after step — durable save every `every_steps` by rank 0, then a barrier
        # so no rank runs ahead of a checkpoint that is not yet on disk.
        if self.snapshots is not None and self.snapshots.due(step):  # in-memory snapshot, async
            self.snapshots.capture(step, self.model, self.optimizer, {"seed": self.spec.train.seed})
        every = self.spec.checkpoint.every_steps
        if every and step % every == 0:
            self._enter("checkpoint")
            if self.rank == 0 or self.pipelined:
                tensors, meta = flatten_training_state(self.model, self.optimizer)
                self.store.save(step, tensors, {**meta, "world": self.world, "seed": self.spec.train.seed})
            dist.barrier()

    def _maybe_inject(self, step: int) -> None:
        if self.inject is None or step != self.inject.step or self.attempt != 0:
            return
        self.log.event(
            "failure_injected", rank=self.rank, step=step, kind=self.inject.kind, pid=os.getpid()
        )
        if self.inject.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        self._enter("injected_hang")
        threading.Event().wait()  # a hang: never returns; the controller must notice

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
