"""[engine] kind = 'deepspeed' in launched jobs: ZeRO-1/2/3 on trainmem's process group recover bitwise from a
SIGKILL (the group restarts: DeepSpeed cannot re-form its groups), their losses equal the DDP engine's, and a
ZeRO-3 checkpoint written by 2 ranks continues on 1 (trainmem's reshard of the per-rank partitions)."""

from __future__ import annotations

import pytest

from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
STEPS = 12


def _spec(run_dir, **sections):
    sections.setdefault("train", {}).setdefault("steps", STEPS)
    sections.setdefault("cluster", {}).setdefault("start_timeout_s", 300.0)  # a fresh venv builds DeepSpeed's ops
    return load_spec(None, tiny_overrides(run_dir, **sections))


def _zero(stage: int, **zero) -> dict:
    return {"kind": "deepspeed", "deepspeed_config": {"zero_optimization": {"stage": stage, **zero}}}


def _losses(result) -> dict[int, float]:
    """Loss per step; a step redone after a restore keeps its last (resumed) value."""
    return {m["step"]: m["loss"] for m in read_jsonl(f"{result.run_dir}/metrics.jsonl")}


@pytest.fixture(scope="module")
def ddp(ray_cluster, tmp_path_factory):
    return Controller(_spec(tmp_path_factory.mktemp("ds") / "ddp")).run()


@pytest.fixture(scope="module")
def zero3_killed(ray_cluster, tmp_path_factory):
    spec = _spec(tmp_path_factory.mktemp("ds") / "z3", engine=_zero(3), checkpoint={"snapshot_every": 1})
    return spec, Controller(spec, inject=InjectedFailure(rank=1, step=8, kind="kill")).run()


def _check_recovered(spec, result, ddp):
    events = read_jsonl(spec.run_dir / "events.jsonl")
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["action"] == "restart" and "engine.kind = 'deepspeed'" in restart["reason"], restart
    restored = next(e for e in events if e["event"] == "restored")
    # Partitions have no replica: the restore is the newest step both ranks stored (7, or 6 if the kill beat it).
    assert restored["tier"] == "memory" and restored["step"] in (6, 7), restored
    assert result.restarts == 1 and result.steps == STEPS
    # No GPU here: NVML's absence is said once for the job (not again by the restarted group), nothing else.
    unavailable = [e for e in events if e["event"] == "nvml_unavailable"]
    assert len(unavailable) == 1 and unavailable[0]["reason"], unavailable
    assert not any("gpus" in m for m in read_jsonl(spec.run_dir / "metrics.jsonl"))
    losses, reference = _losses(result), _losses(ddp)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == pytest.approx([reference[s] for s in sorted(reference)], rel=1e-5)
    # Bitwise: an uninterrupted run of the same engine ends with the same parameters.
    assert result.params_sha256 is not None


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_recover_bitwise_from_a_kill_with_ddp_losses(ddp, tmp_path, stage):
    spec = _spec(tmp_path / "kill", engine=_zero(stage), checkpoint={"snapshot_every": 1})
    killed = Controller(spec, inject=InjectedFailure(rank=1, step=8, kind="kill")).run()
    _check_recovered(spec, killed, ddp)
    clean = Controller(_spec(tmp_path / "clean", engine=_zero(stage))).run()
    assert killed.params_sha256 == clean.params_sha256


def test_zero_3_recovers_bitwise_from_a_kill_with_ddp_losses(ddp, zero3_killed, tmp_path):
    spec, killed = zero3_killed
    _check_recovered(spec, killed, ddp)
    clean = Controller(_spec(tmp_path / "clean", engine=_zero(3))).run()
    assert killed.params_sha256 == clean.params_sha256


def test_a_zero_3_checkpoint_of_two_ranks_continues_on_one(ddp, zero3_killed):
    spec, _ = zero3_killed
    assert (spec.checkpoint_dir / "rank-1" / "step-00000010").is_dir(), "each rank saves its own partition"
    # One rank reading the same global batch (16 sequences) the two ranks read; train to step 14.
    again = _spec(spec.run_dir, engine=_zero(3), cluster={"workers": 1}, train={"steps": 14, "batch_size": 16})
    result = Controller(again).run()
    restored = [e for e in read_jsonl(again.run_dir / "events.jsonl") if e["event"] == "restored"]
    assert restored[-1]["step"] == 10 and restored[-1]["tier"] == "durable"
    resumed = read_jsonl(again.run_dir / "metrics.jsonl")[-4:]
    assert [m["step"] for m in resumed] == [11, 12, 13, 14]
    reference = _losses(ddp)
    # Steps 11-12 on one rank continue the two-rank run: equal to the DDP run's losses there (fp32 rounding only).
    assert [m["loss"] for m in resumed[:2]] == pytest.approx([reference[11], reference[12]], rel=1e-5)
    assert result.steps == 14 and result.params_sha256 is not None
