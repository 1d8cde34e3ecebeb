"""`trainmem plan JOB.toml`: table or JSON on a real batch; bad input exits 2 with one line."""

from __future__ import annotations

import json

from trainmem.launch import plan_cmd

JOB = """
[model]
size = "tiny"
[train]
batch_size = 2
[memory]
activations = "{mode}"
{extra}
"""


def _job(tmp_path, mode="auto", extra="activation_budget = 0.5"):
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(mode=mode, extra=extra))
    return str(path)


def test_plan_prints_table(tmp_path, capsys):
    assert plan_cmd.main([_job(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "activation plan: auto" in out and "predicted peak" in out and "predicted overhead" in out


def test_plan_json_last_line(tmp_path, capsys):
    assert plan_cmd.main([_job(tmp_path), "--json", "--seq-len", "32"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["predicted_peak"] <= plan["budget_bytes"] and len(plan["rows"]) == 2


def test_infeasible_budget_exits_2_naming_smallest(tmp_path, capsys):
    assert plan_cmd.main([_job(tmp_path, "recompute", "activation_budget = 0.01")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "memory.activation_budget" in err and "smallest feasible budget is" in err


def test_bad_memory_key_exits_2(tmp_path, capsys):
    assert plan_cmd.main([_job(tmp_path, "auto", "activation_budget = 1.5")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory.activation_budget" in err and "(0, 1]" in err
    assert plan_cmd.main([_job(tmp_path, "sometimes", "")]) == 2
    assert "memory.activations" in capsys.readouterr().err
    assert plan_cmd.main([str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert plan_cmd.main([]) == 2
