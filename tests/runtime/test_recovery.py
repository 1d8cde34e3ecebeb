"""Recovery of a lost rank at 3 and 4 workers: kills and hangs, memory and durable tiers, cold and warm
replacements, each ending bitwise equal to an uninterrupted run.

One matrix instead of a module per claim (each whole job costs ~10 CPU-seconds on the 2-core machine):
- any world size: the gradient reduction order is the model's, not the process's. With DDP a freshly
  started rank reduced with its initial buckets while the uninterrupted run had rebuilt them; ring
  all-reduce then added 3 or 4 ranks' gradients in another order and the recovered run drifted in the
  last bits (2 ranks hide it: a+b == b+a).
- only the lost rank is replaced: healthy ranks keep their processes and roll back from memory; a spare
  makes the replacement warm.
- data-parallel replicas snapshot each byte once: each replica captures a third of the state, and a replica
  killed before storing its stripe loses nothing (a healthy replica stores it from its own state).
- SIGTERM to the driver (`trainmem launch`) saves a common step that a resumed run continues from bitwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


@dataclass(frozen=True)
class Case:
    world: int
    failure: InjectedFailure
    snapshots: bool
    """In-memory snapshots every step (restore from memory, 0 steps lost); else the durable tier."""
    spares: int = 0

    @property
    def id(self) -> str:
        f = self.failure
        return f"w{self.world}-{f.kind}-r{f.rank}-s{f.step}-{'memory' if self.snapshots else 'durable'}" + \
            ("-spare" if self.spares else "")


# First, middle and last ranks (rank 0 also writes the durable tier), early and late, around checkpoints.
CASES = [
    Case(world=3, failure=InjectedFailure(rank=0, step=9, kind="kill"), snapshots=True),
    Case(world=3, failure=InjectedFailure(rank=2, step=14, kind="kill"), snapshots=True, spares=1),
    Case(world=3, failure=InjectedFailure(rank=0, step=11, kind="hang"), snapshots=True),
    Case(world=4, failure=InjectedFailure(rank=1, step=7, kind="kill"), snapshots=False),
    Case(world=4, failure=InjectedFailure(rank=3, step=16, kind="hang"), snapshots=False),
]


def _overrides(run_dir, world: int, snapshots: bool = True, **cluster):
    # Two cores: half a CPU per rank lets 3 and 4 ranks share them (each still runs one torch thread).
    return tiny_overrides(run_dir, train={"steps": STEPS},
                          cluster={"workers": world, "cpus_per_worker": 0.5, "hang_timeout_s": 4.0, **cluster},
                          checkpoint={"snapshot_every": 1 if snapshots else 0, "every_steps": 5})


@pytest.fixture(scope="module")
def baselines(ray_cluster, tmp_path_factory):
    """Uninterrupted runs (snapshots on: the stripe test reads their traffic; they do not change the math)."""
    root = tmp_path_factory.mktemp("recovery")
    return {w: Controller(load_spec(None, _overrides(root / f"base-{w}", w))).run() for w in (3, 4)}


def _first(events, name):
    return next(e for e in events if e["event"] == name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_only_the_lost_rank_is_replaced_and_the_run_ends_bitwise(baselines, tmp_path, case):
    failure = case.failure
    spec = load_spec(None, _overrides(tmp_path / "run", case.world, case.snapshots, spares=case.spares))
    result = Controller(spec, inject=failure).run()
    assert result.restarts == 1 and result.steps == STEPS
    assert result.params_sha256 == baselines[case.world].params_sha256, case.id
    events = read_jsonl(spec.run_dir / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.index("failure_injected") < kinds.index("failure_detected") < kinds.index("restored")

    detected = _first(events, "failure_detected")
    assert detected["kind"] == ("died" if failure.kind == "kill" else "hung") and failure.rank in detected["ranks"]
    if failure.kind == "hang":
        assert detected["since_injection_s"] <= spec.cluster.hang_timeout_s + 10
        assert "injected_hang" in detected["cause"]
        # Where it hung: every thread's Python stack, in the event and in the rank's log.
        assert "_maybe_inject" in detected["traceback"][str(failure.rank)]
        assert "_maybe_inject" in open(detected["logs"][str(failure.rank)]).read()

    started = [e for e in events if e["event"] == "workers_started"]
    assert len(started) == 2
    before, after = started[0]["pids"], started[1]["pids"]
    healthy = [r for r in range(case.world) if r != failure.rank]
    assert [after[r] for r in healthy] == [before[r] for r in healthy], "healthy ranks kept their processes"
    assert after[failure.rank] != before[failure.rank]
    source = "spare" if case.spares else "cold"
    replaced = _first(events, "ranks_replaced")
    assert replaced["ranks"] == [failure.rank] and replaced["source"] == {str(failure.rank): source}
    # Kept ranks re-form within a step's collective timeout, not the group's 60 s: at four ranks one of
    # them is no ring neighbour of the lost rank and hears of the loss only through a timeout.
    assert replaced["start_s"] < spec.cluster.collective_timeout_s / 2, replaced

    restored = _first(events, "restored")
    if case.snapshots:
        assert restored["tier"] == "memory" and restored["step"] == failure.step - 1, "0 steps lost"
        repaired = [e for e in events if e["event"] == "snapshot_repaired"]
        assert all(e["ranks"] == [failure.rank] and e["step"] == failure.step - 1 for e in repaired), repaired
    else:
        assert restored["tier"] == "durable" and restored["step"] == (failure.step - 1) // 5 * 5
    steps = [m["step"] for m in read_jsonl(spec.run_dir / "metrics.jsonl")]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))

    # What the summary shows (trainmem launch prints it; make demo too).
    (rec,) = result.recoveries
    assert rec["action"] == "replace" and rec["tier"] == restored["tier"] and rec["replacement"] == {str(failure.rank): source}
    if case.snapshots:
        assert rec["lost_steps"] == 0
    else:
        assert rec["lost_steps"] <= failure.step - 1 - restored["step"]  # the steps after the newest durable one
    kill_to_resumed = _first(events, "resumed")["time"] - _first(events, "failure_injected")["time"]
    assert 0 < rec["fault_to_resumed_s"] <= kill_to_resumed + 1
    if case.snapshots:
        assert kill_to_resumed < (failure.kind == "hang") * spec.cluster.hang_timeout_s + 15


def test_a_different_seed_diverges_at_three_workers(baselines, tmp_path):
    """Negative control: the equalities of this module and test_job are not vacuous."""
    spec = load_spec(None, _overrides(tmp_path / "seed", 3))
    spec.train.seed = 8
    assert Controller(spec).run().params_sha256 != baselines[3].params_sha256


def test_each_replica_captures_a_third_of_the_state(baselines):
    events = read_jsonl(f"{baselines[3].run_dir}/events.jsonl")
    traffic = {e["rank"]: e for e in events if e["event"] == "checkpoint.traffic"}
    assert sorted(traffic) == [0, 1, 2]
    per_snapshot = {r: t["captured"] / t["passes"] for r, t in traffic.items()}
    whole = sum(per_snapshot.values())
    assert all(0.25 <= b / whole <= 0.42 for b in per_snapshot.values()), per_snapshot
    assert all(t["parity"] == 0 and t["shipped"] == 0 for t in traffic.values()), "one node: no parity, no shipping"


def test_sigterm_saves_a_common_step_and_resume_continues_bitwise(baselines, tmp_path):
    run = tmp_path / "run"
    job = tmp_path / "job.toml"
    o = _overrides(run, 3)
    job.write_text("\n".join(f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
                             for section, values in o.items()))
    proc = subprocess.Popen([sys.executable, "-m", "trainmem.launch.cli", "launch", str(job)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (m := read_jsonl(run / "metrics.jsonl")) or m[-1]["step"] < 7:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    preempted = _first(read_jsonl(run / "events.jsonl"), "preempted")
    assert f"--resume {run}" in err and f"saved step {preempted['step']}" in err
    assert preempted["step"] < STEPS and (run / "checkpoints" / f"step-{preempted['step']:08d}").is_dir()
    # What `trainmem launch --resume RUN` runs (its CLI is tested in test_job), on this module's cluster.
    resumed = Controller(load_spec(None, _overrides(run, 3))).run()
    assert resumed.params_sha256 == baselines[3].params_sha256
    restored = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "restored"]
    assert restored[-1]["step"] == preempted["step"] and restored[-1]["tier"] == "durable"
