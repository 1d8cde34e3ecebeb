"""The controller: a small state machine over the worker group.

    STARTING ──▶ RUNNING ──▶ FINISHED
        ▲           │ failure (died | hung | error)           │ SIGTERM (preempt)
        ├─ REPLACING ◀┤ (only the lost ranks are new)          └─▶ PREEMPTED (saved; --resume)
        └─ RESTARTING ◀┘ (the whole group)   └─ the failure policy says stop ─▶ FAILED

It owns the run log (metrics.jsonl, events.jsonl) and the Ray connection; the worker group owns
the ranks; the failure policy decides what to do about a failure (replace the lost ranks,
restart the group, stop); the checkpoint package lists where ranks may restore from, and the
ranks walk those candidates until they all read one.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import ray

from trainmem.checkpoint import Candidate, Location, SnapshotService, check_location_shared, disk_candidates, ordered

from .config import JobSpec
from .cluster import connect_ray
from .engines import replica_groups
from .failure import Decision, FailurePolicy, InjectedFailure
from .runlog import RunLog, read_jsonl, start_sink
from .spares import SparePool
from .worker import rank_log_path
from .worker_group import GroupFailure, WorkerGroup


class JobState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    REPLACING = "replacing"
    RESTARTING = "restarting"
    FINISHED = "finished"
    PREEMPTED = "preempted"
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
    preempted_step: int | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    """Per failure: kind, ranks, how it was recovered, the tier and step restored, steps lost, seconds to resume."""

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
        handle_sigterm: bool = False,
    ):
        """``handle_sigterm``: SIGTERM to this process preempts the job (main thread only; the CLI's choice)."""
        self.spec = spec
        self.handle_sigterm = handle_sigterm
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
        self.spares: SparePool | None = None
        self._preempt = threading.Event()
        self.preempted_step: int | None = None
        self.location: Location | None = None
        self._nodes_checked: set[str] = set()
        self._sink = None

    def preempt(self) -> None:
        """Stop at the next common step, save it durably, and end (call from a SIGTERM handler)."""
        self._preempt.set()

    # ---- the state machine --------------------------------------------------------------
    def run(self) -> JobResult:
        started_ray = connect_ray(self.spec.cluster)
        # After ray.init: Ray's core installs its own SIGTERM handler (it would kill the driver at once).
        previous = (signal.signal(signal.SIGTERM, lambda *_: self.preempt())
                    if self.handle_sigterm and threading.current_thread() is threading.main_thread() else None)
        self.log.event("job_started", workers=self.spec.cluster.workers, steps=self.spec.train.steps,
                       ray_address=self.spec.cluster.address or "embedded")
        try:
            self._open_location()
            self._sink = start_sink(self.spec.run_dir)  # ranks' metrics and events reach run_dir through it
            self._start_snapshots()  # holders start before any trainer
            if self.spec.cluster.spares:
                self.spares = SparePool(self.spec, self.inject)
            results = self._run_attempts()
        finally:
            if self.spares is not None:
                self.spares.shutdown()
            if self.snapshots is not None:
                self.snapshots.shutdown()
            if self.group is not None:
                self.group.shutdown()
            if self._sink is not None:
                ray.kill(self._sink)
            if started_ray:
                ray.shutdown()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._result(results)

    def _open_location(self) -> None:
        """The checkpoint location, with this process's AWS_* credentials resolved for ranks on other nodes."""
        storage = self.spec.checkpoint.storage.resolved()
        self.spec = dataclasses.replace(self.spec, checkpoint=dataclasses.replace(self.spec.checkpoint,
                                                                                  storage=storage))
        self.location = Location(self.spec.checkpoint_uri, storage)
        self._check_location()

    def _check_location(self) -> None:
        """Every node not yet checked must read the driver's sentinel (refused before any rank starts).

        The driver's own node sees what the driver sees; an embedded cluster has no other."""
        if not self._nodes_checked:
            self._nodes_checked.add(ray.get_runtime_context().get_node_id())
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in self._nodes_checked]
        if nodes:
            check_location_shared(self.location, nodes, timeout_s=self.spec.checkpoint.storage.check_timeout_s)
            self._nodes_checked.update(nodes)

    def _start_snapshots(self) -> None:
        if not self.spec.checkpoint.snapshot_every:
            return
        world = self.spec.cluster.workers
        groups = replica_groups(self.spec)
        self.snapshots = SnapshotService(self.spec.checkpoint, world=world, run_dir=self.spec.run_dir,
                                         checkpoint_dir=self.spec.checkpoint_dir, event=self.log.event,
                                         replica_groups=groups)
        self.snapshots.start()

    def _run_attempts(self) -> list[dict[str, Any]] | None:
        attempt, replace = 0, None
        while True:
            try:
                return self._run_one(attempt, replace)
            except GroupFailure as failure:
                decision = self._on_failure(failure, attempt, replacing=replace is not None)
                replace = failure if decision.action == "replace" else None
                attempt += 1

    def _restore_plan(self, attempt: int) -> dict[str, Any]:
        """Every tier's candidates, newest first; memory only when holders outlived the old ranks."""
        candidates: list[Candidate] = []
        if self.snapshots is not None:
            self.snapshots.settle()
            if attempt > 0:
                candidates += self.snapshots.memory_candidates()
        candidates += disk_candidates(self.location, self.spec.cluster.workers)
        return {"candidates": [c.to_json() for c in ordered(candidates)],
                "snapshots": self.snapshots.rank_plan() if self.snapshots is not None else None}

    def _run_one(self, attempt: int, replace: GroupFailure | None) -> list[dict[str, Any]]:
        t_start = time.time()
        if attempt:
            self._check_location()  # a node that joined since: its ranks must see the same checkpoints
        if replace is None:
            self.state = JobState.STARTING
            self.group = WorkerGroup(self.spec, attempt, self.inject)
            restored = self.group.start(lambda: self._restore_plan(attempt))
        else:
            self.state = JobState.REPLACING
            out = self.group.replace(replace.ranks, attempt, lambda: self._restore_plan(attempt), self.spares,
                                     before_plan=lambda ends: self._repair_stripes(replace.ranks, ends))
            restored = out["results"]
            self.log.event("ranks_replaced", attempt=attempt, ranks=sorted(out["replaced"]),
                           source={str(r): s for r, s in out["replaced"].items()},
                           kept_pids={str(r): p for r, p in out["kept_pids"].items()},
                           start_s=round(time.time() - t_start, 3))
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
                           dir=self.spec.checkpoint_uri)
        self.group.start_training()
        self.state = JobState.RUNNING
        while True:
            if self._preempt.is_set():
                return self._stop_for_preemption()
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
                for r in results:  # bytes each rank's snapshot writer moved, counted by the writer
                    if "snapshot_traffic" in r:
                        self.log.event("checkpoint.traffic", rank=r["rank"], **r["snapshot_traffic"])
                self.group.shutdown()
                self.state = JobState.FINISHED
                return results
            time.sleep(self.spec.cluster.health_poll_s)

    def _stop_for_preemption(self) -> list[dict[str, Any]]:
        """Every rank stops after one common step and saves it durably, within the grace period."""
        grace = self.spec.cluster.preempt_grace_s
        t0 = time.time()
        self.group.broadcast("request_stop")
        results = self.group.results_within(grace)
        metrics, events, _ = [], [], None
        try:
            metrics, events, _ = self.group.poll()
        except GroupFailure:
            pass
        for e in events:
            self.log.event(e.pop("event"), **e)
        for record in metrics:
            self._on_metric(record)
        self.group.shutdown()
        self.state = JobState.PREEMPTED
        if results is None or not all(r.get("preempted") for r in results):
            self.log.event("preempt_incomplete", grace_s=grace,
                           reason="ranks did not reach a common step and save it within cluster.preempt_grace_s")
            return []
        self.preempted_step = results[0]["steps"]
        self.log.event("preempted", step=self.preempted_step, save_s=round(time.time() - t0, 3),
                       dir=self.spec.checkpoint_uri)
        return results

    def _repair_stripes(self, failed: list[int], healthy: dict[int, dict[str, Any]]) -> None:
        """Striped replicas: a lost replica's stripe of the step its peers hold is stored by a peer from its
        own (equal) state, so that step commits and nothing is lost."""
        if self.snapshots is None:
            return
        for group in self.snapshots.groups:
            donors = [r for r in group if r in healthy]
            steps = {healthy[r].get("state_step") for r in donors}
            if not donors or len(steps) != 1 or None in steps:
                continue
            step = steps.pop()
            missing = self.snapshots.missing_stripes(step, [r for r in failed if r in group])
            if not missing:
                continue
            try:
                ray.get(self.group.actors[donors[0]].repair_snapshot.remote(step, missing),
                        timeout=self.spec.checkpoint.holder_timeout_s * 2)
                self.log.event("snapshot_repaired", step=step, ranks=missing, by_rank=donors[0])
            except ray.exceptions.RayError as e:  # the restore then uses the newest complete step
                self.log.event("snapshot_repair_failed", step=step, ranks=missing, error=str(e).splitlines()[0][:200])

    def _log_restore(self, attempt: int, restored: list[dict[str, Any]]) -> None:
        """One checkpoint_rejected per candidate a rank could not read (with that rank's reason)."""
        for res in restored:
            for r in res["rejected"]:
                if "another rank" in r["reason"]:
                    continue  # the rank that failed to read it reports the reason
                self.log.event("checkpoint_rejected", attempt=attempt, tier=r["tier"], step=r["step"], rank=r["rank"],
                               reason=r["reason"])

    def _on_failure(self, failure: GroupFailure, attempt: int, replacing: bool) -> Decision:
        detected = time.time()
        injected = [e for e in self.log.events() if e["event"] == "failure_injected"]
        logs = {r: str(rank_log_path(self.spec.run_dir, r)) for r in failure.ranks}
        record = self.log.event(
            "failure_detected", attempt=attempt, kind=failure.kind, ranks=failure.ranks,
            step=failure.step or self._last_logged_step(), cause=failure.cause, logs=logs,
            during="replacement" if replacing else "training",
            **({"traceback": {str(r): t for r, t in failure.details.items()}} if failure.details else {}),
            **({"since_injection_s": round(detected - injected[-1]["time"], 3)} if injected and attempt == 0 else {}),
        )
        record.pop("traceback", None)
        self._failures.append(record)
        decision = self.policy.decide(self._failures, can_replace=self._can_replace())
        if decision.action != "replace" and self.group is not None:
            self.group.shutdown()
            self.group = None
        if decision.action == "stop":
            self.state = JobState.FAILED
            self.log.event("job_failed", cause=str(failure), reason=decision.reason)
            where = ", ".join(logs.values()) if failure.kind not in ("start", "restore") else str(self.log.events_path)
            raise JobFailed(f"job stopped ({decision.reason}): {failure} (see {where})")
        self.state = JobState.REPLACING if decision.action == "replace" else JobState.RESTARTING
        n = self.policy.record_restart()
        self.log.event("restart", attempt=attempt + 1, restarts=n, max_restarts=self.policy.max_restarts,
                       action=decision.action, reason=decision.reason)
        return decision

    def _can_replace(self) -> tuple[bool, str]:
        """Whether lost ranks can be replaced alone, and why not."""
        if self.spec.cluster.recovery != "replace":
            return False, "cluster.recovery = 'restart'"
        if self.group is None or not self.group.actors:
            return False, "no running group"
        if self.spec.engine.deepspeed:
            return False, "engine.kind = 'deepspeed': DeepSpeed's engine cannot re-form its process groups"
        return True, ""

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
            preempted_step=self.preempted_step,
            recoveries=recoveries(self.log.events(), lines, self.t0),
            peak_mem_bytes=max((m["peak_mem_bytes"] for m in lines), default=0),
            failures=self._failures,
        )
        self.log.event("job_finished", **{k: v for k, v in result.to_json().items()
                                          if k not in ("failures", "recoveries")})
        return result


def recoveries(events: list[dict[str, Any]], metrics: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """What each failure of this run cost, from events.jsonl and metrics.jsonl alone.

    Seconds run from the fault (the injection when there was one, else its detection) to the first
    step finished after the restore; steps lost are the steps finished before the fault that the
    restored state does not have.
    """
    events = [e for e in events if e["time"] >= t0]
    out = []
    for i, e in enumerate(events):
        if e["event"] != "failure_detected":
            continue
        later = events[i + 1:]
        injected = next((x for x in reversed(events[:i]) if x["event"] == "failure_injected"), None)
        fault_t = injected["time"] if injected and injected["time"] >= (out[-1]["_t"] if out else t0) else e["time"]
        restored = next((x for x in later if x["event"] == "restored"), None)
        decision = next((x for x in later if x["event"] == "restart"), {})
        replaced = next((x for x in later if x["event"] == "ranks_replaced"), {})
        resumed = next((m for m in metrics if m["time"] > e["time"] and m["attempt"] > e.get("attempt", 0)), None)
        done = max((m["step"] for m in metrics if m["time"] < fault_t), default=0)
        out.append({"_t": e["time"], "kind": e["kind"], "ranks": e["ranks"], "action": decision.get("action", "stop"),
                    "replacement": replaced.get("source"), "tier": restored["tier"] if restored else "none",
                    "restored_step": restored["step"] if restored else 0,
                    "lost_steps": max(0, done - (restored["step"] if restored else 0)),
                    "fault_to_resumed_s": round(resumed["time"] - fault_t, 3) if resumed else None})
    for r in out:
        r.pop("_t")
    return out
