"""`trainmem chaos`: every fault action in five trials, each must end bitwise equal to the fault-free run."""

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


# Five trials fire all seven single-fault actions: seed 3 draws a ``multi`` trial of fragment_flip +
# holder_kill + hang (one run, three recoveries), and one trial each of the kinds a multi never combines.
# Each recovery path also has its own test; this one checks that chaos injects, measures and reports them.
SUITE_KINDS = ("trainer_kill", "multi", "node_remove", "durable_truncate", "driver_sigterm")
SUITE_SEED = 3


def test_the_suite_trials_fire_every_fault_action():
    plans = [draw_plan(SUITE_SEED * 1000 + i, list(SUITE_KINDS), 30, 2) for i in range(len(SUITE_KINDS))]
    assert {p.kind for p in plans} == set(SUITE_KINDS)
    assert {k for p in plans for k in p.kinds} == set(KINDS) - {"multi"}


@pytest.mark.slow
@pytest.mark.timeout(900)  # six launches, each bounded by the trial timeout; longer beside a parallel suite
def test_chaos_trials_over_every_fault_action_all_bitwise(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = main(["chaos", "examples/tiny.toml", "--kinds", ",".join(SUITE_KINDS), "--trials", str(len(SUITE_KINDS)),
               "--seed", str(SUITE_SEED), "--out", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    failed = [(t["seed"], t["kinds"], t["error"]) for t in report["trials"] if not t["passed"]]
    assert rc == 0 and report["passed"], f"failed trials (replay with --replay SEED): {failed}"
    assert {t["kind"] for t in report["trials"]} == set(SUITE_KINDS)
    fired = [f for t in report["trials"] for f in t["faults"]]
    assert {f["kind"] for f in fired} == set(KINDS) - {"multi"}, "every fault action ran"
    for t in report["trials"]:
        assert t["bitwise"] and set(t) >= {"seed", "kind", "bitwise", "lost_steps", "detect_s", "recover_s"}
        assert all("not_fired" not in f for f in t["faults"]), f"trial {t['seed']}: a fault never fired"
        if t["kind"] in ("trainer_kill", "multi", "node_remove", "driver_sigterm"):
            assert t["lost_steps"] == 0, t  # memory tier (or the preemption save): nothing lost
    assert (tmp_path / "chaos.png").stat().st_size > 1000 and (tmp_path / "chaos.json").exists()
