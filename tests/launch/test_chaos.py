"""`trainmem chaos`: 8 trials, one per fault kind, each must end bitwise equal to the fault-free run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainmem.launch.cli import main
from trainmem.runtime.faults import KINDS, draw_plan

ROOT = Path(__file__).resolve().parents[2]


def test_plans_are_a_pure_function_of_the_trial_seed_and_cover_the_kinds():
    plans = [draw_plan(1000 + i, list(KINDS), 30, 2) for i in range(12)]
    assert {p.kind for p in plans} == set(KINDS), "12 trials over 8 kinds take every kind"
    again = [draw_plan(1000 + i, list(KINDS), 30, 2) for i in range(12)]
    assert [(p.kinds, [(f.step, f.rank) for f in p.faults]) for p in plans] == \
        [(p.kinds, [(f.step, f.rank) for f in p.faults]) for p in again]
    for p in plans:
        assert all(4 <= f.step <= 20 and 0 <= f.rank < 2 for f in p.faults), "room left to recover before step 30"


def test_bad_kinds_are_refused(capsys):
    assert main(["chaos", str(ROOT / "examples/tiny.toml"), "--kinds", "meteor"]) == 2
    assert "meteor" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)  # nine launches, each bounded by the trial timeout; longer beside a parallel suite
def test_chaos_one_trial_per_kind_all_bitwise(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = main(["chaos", "examples/tiny.toml", "--trials", str(len(KINDS)), "--seed", "1", "--out", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    failed = [(t["seed"], t["kinds"], t["error"]) for t in report["trials"] if not t["passed"]]
    assert rc == 0 and report["passed"], f"failed trials (replay with --replay SEED): {failed}"
    assert len(report["trials"]) == len(KINDS) and {t["kind"] for t in report["trials"]} == set(KINDS)
    for t in report["trials"]:
        assert t["bitwise"] and set(t) >= {"seed", "kind", "bitwise", "lost_steps", "detect_s", "recover_s"}
        assert all("not_fired" not in f for f in t["faults"]), f"trial {t['seed']}: a fault never fired"
        if t["kind"] in ("trainer_kill", "hang", "node_remove", "fragment_flip", "holder_kill", "driver_sigterm"):
            assert t["lost_steps"] == 0, t  # memory tier (or the preemption save): nothing lost
    assert (tmp_path / "chaos.png").stat().st_size > 1000 and (tmp_path / "chaos.json").exists()
