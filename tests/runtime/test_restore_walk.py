"""A restart walks back over corrupt checkpoints to the newest one every rank can read.

Before: a checksum error on the newest durable step was caught, the group restarted, hit the same
error at the same step and the job stopped, although older intact checkpoints existed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trainmem.runtime import Controller, InjectedFailure, JobFailed, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _spec(run_dir, **sections):
    sections.setdefault("checkpoint", {}).update({"every_steps": 5, "keep": 3})
    return load_spec(None, tiny_overrides(run_dir, train={"steps": 24}, **sections))


def _flip(path: Path, offset: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(8)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def _corrupt_when_written(step_dir: Path) -> threading.Thread:
    """Flip bytes in a durable step's tensors as soon as the step is committed (manifest present)."""

    def run() -> None:
        deadline = time.monotonic() + 120
        while not (step_dir / "manifest.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _flip(step_dir / "state.safetensors")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def baseline(ray_cluster, tmp_path_factory):
    return Controller(_spec(tmp_path_factory.mktemp("walk") / "base")).run()


def test_a_corrupt_newest_checkpoint_is_rejected_and_an_older_one_restores_bitwise(baseline, tmp_path):
    spec = _spec(tmp_path / "run")
    corrupter = _corrupt_when_written(spec.checkpoint_dir / "step-00000020")
    result = Controller(spec, inject=InjectedFailure(rank=1, step=22, kind="kill")).run()
    corrupter.join(5)
    events = read_jsonl(spec.run_dir / "events.jsonl")
    rejected = [e for e in events if e["event"] == "checkpoint_rejected"]
    assert rejected and {(e["tier"], e["step"]) for e in rejected} == {("durable", 20)}
    assert "state.safetensors" in rejected[0]["reason"] and "checksum" in rejected[0]["reason"]
    restored = [e for e in events if e["event"] == "restored"]
    assert [(e["tier"], e["step"]) for e in restored] == [("durable", 15)]
    assert result.restarts == 1 and result.params_sha256 == baseline.params_sha256
    # The replay rewrote step 20 over the corrupt copy, and LATEST still names the newest step.
    assert (spec.checkpoint_dir / "LATEST").read_text().strip() == "20"


def test_resume_walks_back_and_stops_with_the_cause_when_nothing_is_left(baseline, tmp_path):
    first = _spec(tmp_path / "run")
    first.train.steps = 21
    Controller(first).run()
    _flip(first.checkpoint_dir / "step-00000020" / "state.safetensors")
    again = _spec(tmp_path / "run")
    result = Controller(again).run()  # what `trainmem launch --resume` runs
    events = read_jsonl(again.run_dir / "events.jsonl")
    assert [(e["tier"], e["step"]) for e in events if e["event"] == "checkpoint_rejected"] == [("durable", 20)] * 2
    assert [e["step"] for e in events if e["event"] == "restored"] == [15]
    assert result.params_sha256 == baseline.params_sha256

    # keep = 3: steps 10, 15 and 20 (rewritten by the resumed run) are left; with all of them corrupt
    # the next launch stops, naming each one, and never starts over from step 0.
    for step in (10, 15, 20):
        _flip(first.checkpoint_dir / f"step-{step:08d}" / "state.safetensors")
    with pytest.raises(JobFailed, match=r"no checkpoint can be restored.*durable step 20.*durable step 15.*durable step 10"):
        Controller(_spec(tmp_path / "run")).run()
    events = read_jsonl(first.run_dir / "events.jsonl")
    last = max(i for i, e in enumerate(events) if e["event"] == "job_started")
    assert not [e for e in events[last:] if e["event"] == "restored"]
    assert events[-1]["event"] == "job_failed"
    metrics = read_jsonl(first.run_dir / "metrics.jsonl")
    assert max(m["attempt"] for m in metrics) == 0, "never silently restarted from step 0"
