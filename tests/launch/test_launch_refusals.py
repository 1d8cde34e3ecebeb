"""A fresh launch never clobbers any tier's state; --resume gets a fresh launch's checks; no tracebacks."""

from __future__ import annotations

import json

import pytest

from trainmem.launch.cli import main


def _job(tmp_path, run_dir, extra: str = "") -> str:
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nsize = "tiny"\n[train]\nsteps = 3\nrun_dir = "{run_dir}"\n{extra}')
    return str(job)


@pytest.mark.parametrize("tier", ["flush", "per-rank durable", "durable step folder only"])
def test_fresh_launch_into_a_run_with_any_tier_refuses_naming_resume(tmp_path, capsys, tier):
    run = tmp_path / "run"
    ck = run / "checkpoints"
    if tier == "flush":  # flushed snapshots only (durable every_steps = 0): resumed silently before
        (ck / "snapshots").mkdir(parents=True)
        (ck / "snapshots" / "SNAPSHOT-LATEST").write_text("5")
    elif tier == "per-rank durable":
        (ck / "rank-1" / "step-00000005").mkdir(parents=True)
        (ck / "rank-1" / "step-00000005" / "manifest.json").write_text("{}")
    else:
        (ck / "step-00000005").mkdir(parents=True)
        (ck / "step-00000005" / "manifest.json").write_text("{}")
    assert main(["launch", _job(tmp_path, run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--resume {run}" in err and "train.run_dir" in err, err


def test_resume_checks_the_saved_spec_like_a_fresh_launch(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    spec = {"cluster": {"workers": 64}, "train": {"run_dir": str(run)}}
    (run / "spec.json").write_text(json.dumps(spec))
    assert main(["launch", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cluster.workers" in err and "CPUs" in err, err
    (run / "spec.json").write_text("{not json")
    assert main(["launch", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "spec.json" in err and "unreadable" in err and "Traceback" not in err
    assert main(["launch", _job(tmp_path, run), "--resume", str(run)]) == 2
    assert "not both" in capsys.readouterr().err


def test_an_internal_error_is_one_line_with_the_traceback_in_the_run_logs(tmp_path, capsys, monkeypatch):
    from trainmem.runtime import controller

    def boom(self):
        raise KeyError("holder table")

    monkeypatch.setattr(controller.Controller, "run", boom)
    run = tmp_path / "run"
    assert main(["launch", _job(tmp_path, run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = [ln for ln in err if "internal error" in ln]
    assert line and "KeyError" in line[0] and str(run / "logs" / "driver.log") in line[0]
    assert "Traceback" in (run / "logs" / "driver.log").read_text()


def test_any_command_fails_in_one_line_without_a_traceback(capsys, monkeypatch):
    from trainmem.launch import config_cmd

    monkeypatch.setattr(config_cmd, "explain_rows", lambda: 1 / 0)
    assert main(["config", "explain"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ZeroDivisionError" in err and "traceback in" in err
