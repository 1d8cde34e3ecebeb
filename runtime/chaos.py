"""`trainmem chaos`: run a job many times under random real faults and check every run ends bitwise.

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head without CPUs plus ``nodes``
raylets on this machine) hosts one fault-free reference run and then the trials. Each trial's
faults are drawn from its own seed (:func:`trainmem.runtime.faults.draw_plan`), so a failed trial
is replayed exactly with ``--replay SEED``; each fault lands at its drawn step (rank 0, and with it
every rank, is held at that step's end until the fault is injected). A trial passes when the job
finishes and its final ``params_sha256`` equals the reference's; its figures (steps lost, seconds to
detect, seconds from the fault to training resumed) come from the run's own events.jsonl and
metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

from .config import JobSpec
from .faults import ACTIONS, Fault, TrialPlan, remove_trainer_node
from .runlog import read_jsonl

_MB = 1024 * 1024


@dataclass
class TrialResult:
    seed: int
    kind: str
    kinds: list[str]
    passed: bool
    bitwise: bool
    lost_steps: int | None
    detect_s: float | None
    recover_s: float | None
    restarts: int
    run_dir: str
    error: str = ""
    faults: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def chaos_spec(spec: JobSpec, address: str, run_dir: Path, plan: TrialPlan | None) -> JobSpec:
    """The job as chaos runs it: on the chaos cluster, in-memory snapshots on, short hang timeout."""
    s = dataclasses.replace(spec, train=dataclasses.replace(spec.train, run_dir=str(run_dir)),
                            cluster=dataclasses.replace(spec.cluster, address=address, placement="SPREAD",
                                                        hang_timeout_s=min(spec.cluster.hang_timeout_s, 5.0),
                                                        max_restarts=max(spec.cluster.max_restarts, 8)),
                            checkpoint=dataclasses.replace(spec.checkpoint, dir="",
                                                           snapshot_every=spec.checkpoint.snapshot_every or 1))
    if plan is not None and "durable_truncate" in plan.kinds:  # the walk back over disk is what it tests
        s.checkpoint.snapshot_every, s.checkpoint.flush_every = 0, 0
        s.checkpoint.every_steps = s.checkpoint.every_steps or 5
    return s


class ChaosRun:
    def __init__(self, spec: JobSpec, out_dir: Path, nodes: int = 3, trial_timeout_s: float = 300.0,
                 on_trial: Callable[[TrialResult], None] | None = None):
        self.spec, self.out_dir, self.nodes = spec, Path(out_dir), nodes
        self.trial_timeout_s = trial_timeout_s
        self.on_trial = on_trial or (lambda r: None)
        self.node_args = {"num_cpus": max(2, int(spec.cluster.cpus_per_worker * 2 + 0.999)),
                          "object_store_memory": 100 * _MB}
        self.cluster = None
        self.reference_sha: str | None = None

    # ---- the cluster -----------------------------------------------------------------------
    def __enter__(self) -> "ChaosRun":
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": 100 * _MB, "include_dashboard": False})
        for _ in range(self.nodes):
            self.cluster.add_node(**self.node_args)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace="trainmem", log_to_driver=False, logging_level="ERROR")
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    def _top_up_nodes(self) -> None:
        """Back to ``nodes`` raylets after a trial removed some."""
        alive = [n for n in self.cluster.list_all_nodes() if n is not self.cluster.head_node]
        for _ in range(self.nodes - len(alive)):
            self.cluster.add_node(**self.node_args)
        self.cluster.wait_for_nodes()

    # ---- runs --------------------------------------------------------------------------------
    def reference(self) -> str:
        from .controller import Controller

        spec = chaos_spec(self.spec, self.cluster.address, self.out_dir / "reference", None)
        self.reference_sha = Controller(spec).run().params_sha256
        return self.reference_sha

    def trial(self, plan: TrialPlan) -> TrialResult:
        self._top_up_nodes()
        run_dir = self.out_dir / f"trial-{plan.seed}"
        spec = chaos_spec(self.spec, self.cluster.address, run_dir, plan)
        try:
            if plan.kind == "driver_sigterm":
                sha, restarts = self._sigterm_trial(spec, plan.faults[0])
            else:
                sha, restarts = self._in_process_trial(spec, plan)
            error = ""
        except Exception as e:  # reported with the seed; the next trial goes on
            sha, restarts, error = None, 0, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        result = measure(plan, run_dir, sha, self.reference_sha, restarts, error)
        self.on_trial(result)
        return result

    def _in_process_trial(self, spec: JobSpec, plan: TrialPlan) -> tuple[str | None, int]:
        from .controller import Controller

        seen = {"step": 0}
        controller = Controller(spec, on_progress=lambda rec: seen.__setitem__("step", rec["step"]))
        out: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: out.update(result=_catch(controller.run)), daemon=True)
        runner.start()
        releases = []
        for i, fault in enumerate(plan.faults):
            held = self._hold_at(controller, fault, seen, runner)
            if not runner.is_alive():
                break
            fault.fired_at = time.time()
            try:
                if fault.kind == "node_remove":
                    remove_trainer_node(controller, fault, self.cluster)
                else:
                    ACTIONS[fault.kind](controller, fault)
            except Exception as e:  # the target vanished meanwhile (it was being replaced): note it, go on
                fault.detail["not_injected"] = f"{type(e).__name__}: {e}"
            finally:
                if held is not None:  # not waited for: the fault may have stopped it
                    after = plan.faults[i + 1].step + 1 if i + 1 < len(plan.faults) else None
                    releases.append(held.release_hold.remote(then_before=after))
            if fault.kind == "node_remove":
                self._top_up_nodes()
            seen["step"] = 0  # the next fault waits for progress after this one
        runner.join(self.trial_timeout_s)
        for ref in releases:  # read, so Ray does not report a killed rank's unanswered release as an error
            try:
                ray.get(ref, timeout=1)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        if runner.is_alive():
            raise TimeoutError(f"the job did not finish within {self.trial_timeout_s:g}s (hung)")
        result = out["result"]
        if isinstance(result, BaseException):
            raise result
        return result.params_sha256, result.restarts

    def _hold_at(self, controller, fault: Fault, seen: dict[str, int], runner: threading.Thread):
        """Wait until the job has finished ``fault.step`` with rank 0 held before the next step, so the
        fault lands there even when the job is fast. The hold is set again on a group that recovery
        replaced meanwhile. Returns the held rank-0 actor (None when the job ended first)."""
        from .controller import JobState

        held = None
        while runner.is_alive():
            group = controller.group
            if controller.state == JobState.RUNNING and group is not None and group.actors:
                actor = group.actors[0]
                if actor is not held:
                    try:
                        ray.get(actor.hold_before.remote(fault.step + 1), timeout=10)
                        held = actor
                    except ray.exceptions.RayError:
                        held = None  # being replaced: set it on the next group
                if held is not None and seen["step"] >= fault.step:
                    return held
            time.sleep(0.02)
        return None

    def _sigterm_trial(self, spec: JobSpec, fault: Fault) -> tuple[str | None, int]:
        """SIGTERM the driver (a `trainmem launch` process), then `--resume` the run to the end."""
        run = Path(spec.train.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1))
        cmd = [sys.executable, "-m", "trainmem.launch.cli", "launch", "--resume", str(run)]
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.trial_timeout_s
        while not (m := read_jsonl(run / "metrics.jsonl")) or m[-1]["step"] < fault.step:
            if first.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the first launch ended before step {fault.step}: {first.stderr.read()[-300:]}")
            time.sleep(0.05)
        fault.fired_at = time.time()
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=self.trial_timeout_s)
        if first.returncode != 143:
            raise RuntimeError(f"SIGTERM: exit {first.returncode}, expected 143 (preempted): {err[-300:]}")
        again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=self.trial_timeout_s)
        if again.returncode != 0:
            raise RuntimeError(f"--resume failed ({again.returncode}): {again.stderr[-300:]}")
        summary = json.loads(again.stdout.strip().splitlines()[-1])
        return summary["params_sha256"], summary["restarts"]


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # handed to the main thread, which raises it
        return e


def measure(plan: TrialPlan, run_dir: Path, sha: str | None, reference: str | None, restarts: int,
            error: str) -> TrialResult:
    """Figures of one trial from its run's own files, timed from the first fault."""
    events = read_jsonl(run_dir / "events.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    fired = [f for f in plan.faults if f.fired_at is not None]
    detect_s = recover_s = None
    lost = 0 if fired else None
    if fired:
        t = fired[0].fired_at

        def first_after(*names: str) -> dict[str, Any] | None:
            return next((e for e in events if e["event"] in names and e["time"] >= t), None)

        detected = first_after("failure_detected", "checkpoint.holder_lost", "preempted")
        detect_s = round(detected["time"] - t, 3) if detected else None
        resumed = first_after("resumed", "checkpoint.holder_replaced")
        if resumed is None and first_after("preempted"):  # the --resume launch: its first finished step
            relaunch = next((e for e in events if e["event"] == "job_started" and e["time"] >= t), None)
            resumed = next((m for m in metrics if relaunch and m["time"] >= relaunch["time"]), None)
        recover_s = round(resumed["time"] - t, 3) if resumed else None
        restored = first_after("restored")
        done_before = max((m["step"] for m in metrics if m["time"] < t), default=0)
        lost = max(0, done_before - restored["step"]) if restored else 0
    bitwise = sha is not None and sha == reference
    return TrialResult(plan.seed, plan.kind, plan.kinds, bitwise and not error, bitwise, lost, detect_s, recover_s,
                       restarts, str(run_dir), error,
                       [{"kind": f.kind, "step": f.step, "rank": f.rank, **({"fired_at": f.fired_at} if f.fired_at
                                                                              else {"not_fired": True}), **f.detail}
                        for f in plan.faults])


def summarize(trials: list[TrialResult]) -> dict[str, dict[str, Any]]:
    """Per fault kind: trials, recovered, bitwise, lost steps, median detect and fault → resumed seconds."""
    import statistics

    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({t.kind for t in trials}):
        rows = [t for t in trials if t.kind == kind]
        detect = [t.detect_s for t in rows if t.detect_s is not None]
        recover = [t.recover_s for t in rows if t.recover_s is not None]
        out[kind] = {
            "trials": len(rows), "recovered": sum(not t.error for t in rows), "bitwise": sum(t.bitwise for t in rows),
            "lost_steps": max((t.lost_steps or 0 for t in rows), default=0),
            "median_detect_s": round(statistics.median(detect), 3) if detect else None,
            "median_recover_s": round(statistics.median(recover), 3) if recover else None,
        }
    return out


def draw(summary: dict[str, dict[str, Any]], out: Path) -> None:
    """A bar per fault kind: median seconds from the fault to training resumed, with pass counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(kinds)), 4))
    values = [summary[k]["median_recover_s"] or 0 for k in kinds]
    bars = ax.bar(kinds, values, color=["tab:green" if summary[k]["bitwise"] == summary[k]["trials"] else "tab:red"
                                        for k in kinds])
    for bar, k in zip(bars, kinds):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{summary[k]['bitwise']}/{summary[k]['trials']}",
                ha="center", va="bottom")
    ax.set_ylabel("median fault -> resumed (s)")
    ax.set_title("trainmem chaos: bitwise trials per fault kind (green: all)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
