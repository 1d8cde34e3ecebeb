"""Only the lost rank is replaced: healthy ranks keep their processes, roll back from memory, and the
run ends bitwise equal to an uninterrupted one. Plus: a spare makes the replacement warm, and
SIGTERM to the driver saves a common step that --resume continues from bitwise."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WORLD, STEPS = 3, 20


def _overrides(run_dir, **cluster):
    return tiny_overrides(run_dir, train={"steps": STEPS},
                          cluster={"workers": WORLD, "cpus_per_worker": 0.5, "hang_timeout_s": 4.0, **cluster},
                          checkpoint={"snapshot_every": 1, "every_steps": 5})


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory):
    return Controller(load_spec(None, _overrides(tmp_path_factory.mktemp("replace") / "base"))).run()


def _first(events, name):
    return next(e for e in events if e["event"] == name)


@pytest.mark.parametrize("spares,failure", [
    (0, InjectedFailure(rank=1, step=9, kind="kill")),
    (1, InjectedFailure(rank=2, step=14, kind="kill")),
    (0, InjectedFailure(rank=0, step=11, kind="hang")),
], ids=["cold-kill-r1", "spare-kill-r2", "cold-hang-r0"])
def test_only_the_lost_rank_is_replaced_and_nothing_is_lost(baseline, tmp_path, spares, failure):
    spec = load_spec(None, _overrides(tmp_path / "run", spares=spares))
    result = Controller(spec, inject=failure).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    started = [e for e in events if e["event"] == "workers_started"]
    assert len(started) == 2
    before, after = started[0]["pids"], started[1]["pids"]
    healthy = [r for r in range(WORLD) if r != failure.rank]
    assert [after[r] for r in healthy] == [before[r] for r in healthy], "healthy ranks kept their processes"
    assert after[failure.rank] != before[failure.rank]
    replaced = _first(events, "ranks_replaced")
    assert replaced["ranks"] == [failure.rank] and replaced["source"] == {str(failure.rank): "spare" if spares else "cold"}
    restored = _first(events, "restored")
    assert restored["tier"] == "memory" and restored["step"] == failure.step - 1, "0 steps lost"
    assert result.params_sha256 == baseline.params_sha256
    kill_to_resumed = _first(events, "resumed")["time"] - _first(events, "failure_injected")["time"]
    assert kill_to_resumed < (failure.kind == "hang") * spec.cluster.hang_timeout_s + 15
    # What the summary shows (trainmem launch prints it; make demo too).
    (rec,) = result.recoveries
    assert rec["action"] == "replace" and rec["tier"] == "memory" and rec["lost_steps"] == 0
    assert rec["replacement"] == {str(failure.rank): "spare" if spares else "cold"}
    assert 0 < rec["fault_to_resumed_s"] <= kill_to_resumed + 1


def test_sigterm_saves_a_common_step_and_resume_continues_bitwise(baseline, tmp_path):
    run = tmp_path / "run"
    job = tmp_path / "job.toml"
    o = _overrides(run)
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
    out = subprocess.run([sys.executable, "-m", "trainmem.launch.cli", "launch", "--resume", str(run), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["params_sha256"] == baseline.params_sha256
    restored = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "restored"]
    assert restored[-1]["step"] == preempted["step"] and restored[-1]["tier"] == "durable"
