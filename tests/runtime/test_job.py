"""Whole jobs on an embedded Ray cluster: determinism, restart limits, --resume (recovery: test_recovery)."""

from __future__ import annotations

import json

import pytest

from trainmem.runtime import Controller, InjectedFailure, JobFailed, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


def tiny_spec(tmp_path, name, **cluster):
    return load_spec(None, tiny_overrides(tmp_path / name, cluster=cluster))


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory):
    return Controller(tiny_spec(tmp_path_factory.mktemp("base"), "run")).run()


def baseline_dir(result):
    from pathlib import Path

    return Path(result.run_dir)


def test_loss_decreases_and_same_seed_gives_same_params(baseline, tmp_path):
    again = Controller(tiny_spec(tmp_path, "again")).run()
    assert baseline.steps == again.steps == 30
    assert baseline.restarts == 0
    assert again.params_sha256 == baseline.params_sha256
    metrics = read_jsonl(tmp_path / "again" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first, last = sum(m["loss"] for m in metrics[:5]) / 5, sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < first - 0.5, (first, last)
    base_losses = [m["loss"] for m in read_jsonl(baseline_dir(baseline) / "metrics.jsonl")]
    assert base_losses == [m["loss"] for m in metrics]


def test_restarts_exhausted_stops_with_the_cause(ray_cluster, tmp_path):
    spec = tiny_spec(tmp_path, "norestart", max_restarts=0)
    with pytest.raises(JobFailed, match=r"died on rank\(s\) \[1\]"):
        Controller(spec, inject=InjectedFailure(rank=1, step=3, kind="kill")).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    assert events[-1]["event"] == "job_failed" and "0 restarts" in events[-1]["reason"]


def test_resume_a_stopped_run_from_its_run_dir(baseline, tmp_path, capsys):
    from trainmem.launch.cli import main

    job = tmp_path / "job.toml"
    job.write_text(
        '[model]\nsize = "tiny"\n[train]\nsteps = 12\nbatch_size = 8\nlr = 3e-3\nseed = 7\n'
        f'run_dir = "{tmp_path / "run"}"\n[cluster]\nworkers = 2\n[checkpoint]\nevery_steps = 5\n'
    )
    assert main(["launch", str(job), "--json"]) == 0
    assert main(["launch", str(job)]) == 2  # the run folder has checkpoints: must say --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["launch", "--resume", str(tmp_path / "run"), "--steps", "30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["params_sha256"] == baseline.params_sha256
    restored = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "restored"]
    assert restored[-1]["step"] == 10
