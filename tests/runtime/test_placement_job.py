"""[placement] in a launched job: chunked, sharded state recovers bitwise from a SIGKILL (snapshots on),
and a checkpoint written at world 2 continues at world 1 bitwise."""

from __future__ import annotations

import pytest

from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow
PLACE = {"device_bytes": "512KiB", "host_bytes": "64MiB"}  # tiny's params+grads+AdamW are ~2.1 MiB: 4x the budget


def _spec(run_dir, **sections):
    sections.setdefault("train", {}).setdefault("steps", 16)
    sections.setdefault("placement", dict(PLACE))
    return load_spec(None, tiny_overrides(run_dir, **sections))


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory):
    return Controller(_spec(tmp_path_factory.mktemp("place") / "clean")).run()


def _losses(result):
    return [m["loss"] for m in read_jsonl(f"{result.run_dir}/metrics.jsonl")]


def test_placed_job_recovers_a_killed_rank_bitwise_and_matches_ddp(clean, tmp_path):
    spec = _spec(tmp_path / "kill", checkpoint={"snapshot_every": 1})
    result = Controller(spec, inject=InjectedFailure(rank=1, step=9, kind="kill")).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    restored = next(e for e in events if e["event"] == "restored")
    # Shards have no replica: a snapshot the killed rank had captured but not yet stored is lost with
    # it, so the restore is the newest step every rank stored (8, or 7 when the kill beat the store).
    assert restored["tier"] == "memory" and restored["step"] in (7, 8)
    assert next(e for e in events if e["event"] == "ranks_replaced")["ranks"] == [1]
    assert result.params_sha256 == clean.params_sha256
    metrics = read_jsonl(spec.run_dir / "metrics.jsonl")
    assert all(m["arena_peak_bytes"] <= m["device_budget_bytes"] == 512 * 1024 for m in metrics)
    ddp = Controller(load_spec(None, tiny_overrides(tmp_path / "ddp", train={"steps": 16}))).run()
    assert _losses(clean) == pytest.approx(_losses(ddp), rel=1e-5)


def test_a_world_two_checkpoint_continues_at_world_one_bitwise(clean, tmp_path):
    first = _spec(tmp_path / "run", train={"steps": 10})
    Controller(first).run()
    assert (first.checkpoint_dir / "rank-1" / "step-00000010").is_dir(), "each rank saves its own shards"
    # One rank reading the same global batch (16 sequences) as two half-batches, as two ranks did.
    again = _spec(tmp_path / "run", cluster={"workers": 1}, train={"batch_size": 16},
                  placement={**PLACE, "micro_batches": 2})
    result = Controller(again).run()
    restored = [e for e in read_jsonl(again.run_dir / "events.jsonl") if e["event"] == "restored"]
    assert restored[-1]["step"] == 10 and restored[-1]["tier"] == "durable"
    assert result.params_sha256 == clean.params_sha256
