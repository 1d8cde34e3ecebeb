"""The controller: a small state machine over the worker group.

    STARTING ──▶ RUNNING ──▶ FINISHED
        ▲           │ failure (died | hung | error)
        └─ RESTARTING ◀┘        └─ the failure policy says stop ─▶ FAILED

It owns the run log (metrics.jsonl, events.jsonl) and the Ray connection; the worker group owns
the ranks; the failure policy decides whether to go again; the checkpoint package lists where a
restart may restore from, and the ranks walk those candidates until they all read one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import ray

from trainmem.checkpoint import Candidate, SnapshotService, disk_candidates, ordered

from .config import JobSpec
from .failure import FailurePolicy, InjectedFailure
from .runlog import RunLog, read_jsonl
from .worker import rank_log_path
from .worker_group import GroupFailure, WorkerGroup, connect_ray


class JobState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    FAILED = "failed"


class JobFailed(RuntimeError):
    """The job stopped: restarts exhausted or a failure that a restart cannot fix."""


@dataclass
class JobResult:
    steps: int
    final_loss: float | None
    restarts: int
    wall_s: float
    tokens_per_s: float
    params_sha256: str | None
    first_step_s: float | None
    run_dir: str
    state: str
    peak_mem_bytes: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[dict[str, Any]], None]


class Controller:
    def __init__(
        self,
        spec: JobSpec,
        *,
        inject: InjectedFailure | None = None,
        on_progress: ProgressFn | None = None,
        t0: float | None = None,
    ):
        self.spec = spec
        self.inject = inject
        self.on_progress = on_progress or (lambda record: None)
        self.t0 = time.time() if t0 is None else t0
        self.log = RunLog(spec.run_dir)
        self.policy = FailurePolicy(spec.cluster.max_restarts)
        self.state = JobState.STARTING
        self.group: WorkerGroup | None = None
        self._last_metric: dict[str, Any] | None = None
        self._failures: list[dict[str, Any]] = []
        self.snapshots: SnapshotService | None = None

    # ---- the state machine --------------------------------------------------------------
    def run(self) -> JobResult:
        started_ray = connect_ray(self.spec.cluster)
        self.log.event("job_started", workers=self.spec.cluster.workers, steps=self.spec.train.steps,
                       ray_address=self.spec.cluster.address or "embedded")
        try:
            self._start_snapshots()  # holders start before any trainer
            results = self._run_attempts()
        finally:
            if self.snapshots is not None:
                self.snapshots.shutdown()
            if self.group is not None:
                self.group.shutdown()
            if started_ray:
                ray.shutdown()
        return self._result(results)

    def _start_snapshots(self) -> None:
        if not self.spec.checkpoint.snapshot_every:
            return
        world = self.spec.cluster.workers
        # DDP ranks are replicas (one stored snapshot per step suffices); pipeline stages are not.
        groups = [[r] for r in range(world)] if self.spec.pipeline.stages > 1 else [list(range(world))]
        self.snapshots = SnapshotService(self.spec.checkpoint, world=world, run_dir=self.spec.run_dir,
                                         checkpoint_dir=self.spec.checkpoint_dir, event=self.log.event,
                                         replica_groups=groups)
        self.snapshots.start()

    def _run_attempts(self) -> list[dict[str, Any]] | None:
        attempt = 0
        while True:
            try:
                return self._run_one(attempt)
            except GroupFailure as failure:
                self._on_failure(failure, attempt)
                attempt += 1

    def _restore_plan(self, attempt: int) -> dict[str, Any]:
        """Every tier's candidates, newest first; memory only when holders outlived the old ranks."""
        candidates: list[Candidate] = []
        if self.snapshots is not None:
            self.snapshots.settle()
            if attempt > 0:
                candidates += self.snapshots.memory_candidates()
        candidates += disk_candidates(self.spec.checkpoint_dir, self.spec.cluster.workers)
        return {"candidates": [c.to_json() for c in ordered(candidates)],
                "snapshots": self.snapshots.rank_plan() if self.snapshots is not None else None}

    def _run_one(self, attempt: int) -> list[dict[str, Any]]:
        self.state = JobState.STARTING
        plan = self._restore_plan(attempt)
        self.group = WorkerGroup(self.spec, attempt, self.inject)
        t_start = time.time()
        restored = self.group.start(plan)
        self._log_restore(attempt, restored)
        step = restored[0]["step"]
        if step is None:
            raise GroupFailure("restore", list(range(self.spec.cluster.workers)),
                               "no checkpoint could be read by every rank: " + "; ".join(
                                   f"{r['tier']} step {r['step']} (rank {r['rank']}: {r['reason']})"
                                   for res in restored for r in res["rejected"] if "another rank" not in r["reason"]))
        if self.snapshots is not None:
            self.snapshots.rollback(step or None)  # later (torn) snapshots go; the redo stores them again
        self.log.event("workers_started", attempt=attempt, resume_after_step=step,
                       start_s=round(time.time() - t_start, 3), pids=self.group.pids())
        if step:
            self.log.event("restored", attempt=attempt, step=step, tier=restored[0]["tier"],
                           dir=str(self.spec.checkpoint_dir))
        self.group.start_training()
        self.state = JobState.RUNNING
        while True:
            metrics, events, results = self.group.poll()
            for e in events:
                self.log.event(e.pop("event"), **e)
            if self.snapshots is not None:
                self.snapshots.poll()
                if self.snapshots.changed:
                    self.group.broadcast("update_snapshot_plan", self.snapshots.rank_plan())
            for record in metrics:
                self._on_metric(record)
            if results is not None:
                self.group.shutdown()
                self.state = JobState.FINISHED
                return results
            time.sleep(self.spec.cluster.health_poll_s)

    def _log_restore(self, attempt: int, restored: list[dict[str, Any]]) -> None:
        """One checkpoint_rejected per candidate a rank could not read (with that rank's reason)."""
        for res in restored:
            for r in res["rejected"]:
                if "another rank" in r["reason"]:
                    continue  # the rank that failed to read it reports the reason
                self.log.event("checkpoint_rejected", attempt=attempt, tier=r["tier"], step=r["step"], rank=r["rank"],
                               reason=r["reason"])

    def _on_failure(self, failure: GroupFailure, attempt: int) -> None:
        detected = time.time()
        injected = [e for e in self.log.events() if e["event"] == "failure_injected"]
        logs = {r: str(rank_log_path(self.spec.run_dir, r)) for r in failure.ranks}
        record = self.log.event(
            "failure_detected", attempt=attempt, kind=failure.kind, ranks=failure.ranks,
            step=failure.step or self._last_logged_step(), cause=failure.cause, logs=logs,
            **({"traceback": {str(r): t for r, t in failure.details.items()}} if failure.details else {}),
            **({"since_injection_s": round(detected - injected[-1]["time"], 3)} if injected and attempt == 0 else {}),
        )
        record.pop("traceback", None)
        self._failures.append(record)
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        decision = self.policy.decide(self._failures)
        if decision.action == "stop":
            self.state = JobState.FAILED
            self.log.event("job_failed", cause=str(failure), reason=decision.reason)
            where = ", ".join(logs.values()) if failure.kind not in ("start", "restore") else str(self.log.events_path)
            raise JobFailed(f"job stopped ({decision.reason}): {failure} (see {where})")
        self.state = JobState.RESTARTING
        n = self.policy.record_restart()
        self.log.event("restart", attempt=attempt + 1, restarts=n, max_restarts=self.policy.max_restarts)

    def _on_metric(self, record: dict[str, Any]) -> None:
        if record["rank"] != 0:
            return  # the loss is already the global mean; rank 0's record stands for the step
        if record["attempt"] > 0 and (self._last_metric is None or self._last_metric["attempt"] != record["attempt"]):
            self.log.event("resumed", attempt=record["attempt"], step=record["step"])
        self._last_metric = record
        self.on_progress(record)

    def _last_logged_step(self) -> int | None:
        lines = read_jsonl(self.log.metrics_path)
        return lines[-1]["step"] if lines else None

    def _result(self, results: list[dict[str, Any]] | None) -> JobResult:
        """Figures come from metrics.jsonl, which rank 0 writes as it goes (polls may miss a crash)."""
        wall = time.time() - self.t0
        lines = [m for m in read_jsonl(self.log.metrics_path) if m["time"] >= self.t0]
        train_time = sum(m["step_time_s"] for m in lines)
        tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in lines)
        sha = next((r["params_sha256"] for r in results or [] if "params_sha256" in r), None)
        result = JobResult(
            steps=max((r["steps"] for r in results or []), default=0),
            final_loss=lines[-1]["loss"] if lines else None,
            restarts=self.policy.restarts,
            wall_s=round(wall, 3),
            tokens_per_s=round(tokens / train_time, 1) if train_time else 0.0,
            params_sha256=sha,
            first_step_s=round(lines[0]["time"] - self.t0, 3) if lines else None,
            run_dir=str(self.spec.run_dir),
            state=self.state.value,
            peak_mem_bytes=max((m["peak_mem_bytes"] for m in lines), default=0),
            failures=self._failures,
        )
        self.log.event("job_finished", **{k: v for k, v in result.to_json().items() if k != "failures"})
        return result
