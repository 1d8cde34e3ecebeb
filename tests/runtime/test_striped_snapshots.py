"""Data-parallel replicas snapshot each byte once: every replica captures a third of the state, and a
replica killed before storing its stripe loses nothing (a healthy replica stores it from its own state)."""

from __future__ import annotations

import pytest

from trainmem.runtime import Controller, InjectedFailure, load_spec
from trainmem.runtime.runlog import read_jsonl

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _spec(run_dir):
    return load_spec(None, tiny_overrides(run_dir, train={"steps": 14},
                                          cluster={"workers": 3, "cpus_per_worker": 0.5},
                                          checkpoint={"snapshot_every": 1, "every_steps": 0}))


@pytest.fixture(scope="module")
def clean(ray_cluster, tmp_path_factory):
    return Controller(_spec(tmp_path_factory.mktemp("stripes") / "clean")).run()


def test_each_replica_captures_a_third_of_the_state(clean):
    traffic = {e["rank"]: e for e in read_jsonl(f"{clean.run_dir}/events.jsonl") if e["event"] == "checkpoint.traffic"}
    assert sorted(traffic) == [0, 1, 2]
    per_snapshot = {r: t["captured"] / t["passes"] for r, t in traffic.items()}
    whole = sum(per_snapshot.values())
    assert all(0.25 <= b / whole <= 0.42 for b in per_snapshot.values()), per_snapshot
    assert all(t["parity"] == 0 and t["shipped"] == 0 for t in traffic.values()), "one node: no parity, no shipping"


@pytest.mark.parametrize("rank", [0, 2])
def test_a_killed_replica_loses_no_step(clean, tmp_path, rank):
    spec = _spec(tmp_path / "kill")
    result = Controller(spec, inject=InjectedFailure(rank=rank, step=9, kind="kill")).run()
    events = read_jsonl(spec.run_dir / "events.jsonl")
    restored = next(e for e in events if e["event"] == "restored")
    assert restored["tier"] == "memory" and restored["step"] == 8, "0 steps lost"
    repaired = [e for e in events if e["event"] == "snapshot_repaired"]
    assert all(e["ranks"] == [rank] and e["step"] == 8 for e in repaired)
    assert result.params_sha256 == clean.params_sha256
