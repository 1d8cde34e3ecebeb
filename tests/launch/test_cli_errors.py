"""Bad input: one line naming the file and key, exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainmem.launch.cli import main

BAD_SPECS = {
    "unknown key": ("[train]\nstepz = 5\n", "train.stepz", "did you mean 'steps'"),
    "unknown section": ("[trian]\nsteps = 5\n", "trian", "unknown key"),
    "wrong type": ('[train]\nsteps = "many"\n', "train.steps", "expected int"),
    "negative steps": ("[train]\nsteps = -5\n", "train.steps", "must be > 0"),
    "too many workers": ("[cluster]\nworkers = 64\n", "cluster.workers", "CPUs"),
    "unreadable data": ('[data]\nsource = "files"\npaths = ["/nonexistent/x.txt"]\n', "data.paths[0]", "readable"),
    "bad model size": ('[model]\nsize = "huge"\n', "model.size", "tiny"),
    "bad norm": ('[model]\nnorm = "batchnorm"\n', "model.norm", "rmsnorm"),
    "heads do not divide": ("[model]\nd_model = 65\n", "model.d_model", "divisible"),
    "bool for int": ("[train]\nbatch_size = true\n", "train.batch_size", "integer"),
    "bad backend": ('[cluster]\nbackend = "mpi"\n', "cluster.backend", "gloo"),
    "bad toml": ("[train\nsteps = 1\n", "<syntax>", "TOML"),
    "two offloads inside a pipeline": ('[pipeline]\nstages = 2\nmicrobatches = 2\noffload = "selective"\n'
                                       '[memory]\nactivations = "offload"\n', "memory.activations", "pick one"),
    "pipeline stages vs workers": ("[pipeline]\nstages = 3\n", "pipeline.stages", "cluster.workers"),
    "negative keep": ("[checkpoint]\nkeep = 0\n", "checkpoint.keep", ">= 1"),
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_naming_the_key(name, tmp_path, capsys):
    text, key, hint = BAD_SPECS[name]
    job = tmp_path / "job.toml"
    job.write_text(text)
    rc = main(["launch", str(job), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert str(job) in err and key in err and hint in err, err
    assert not (tmp_path / "run").exists(), "a rejected job must not create its run folder"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["launch"], "job file is required"),
        (["launch", "missing.toml"], "no such file"),
        (["launch", "examples/tiny.toml", "--inject-failure", "rank=1"], "missing step"),
        (["launch", "examples/tiny.toml", "--inject-failure", "rank=5,step=2"], "rank=5"),
        (["launch", "examples/tiny.toml", "--steps", "x"], "invalid int"),
        (["nope"], "unknown command"),
        (["bench", "nope"], "unknown benchmark"),
        (["config", "frobnicate"], "explain"),
        (["launch", "--resume", "/nonexistent-run"], "not a trainmem run folder"),
    ],
)
def test_bad_command_lines_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_existing_checkpoints_need_resume(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "LATEST").write_text("5")
    assert main(["launch", "examples/tiny.toml", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_console_script_exit_code_and_no_traceback(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("[train]\nsteps = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "trainmem.launch.cli", "launch", str(job)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "train.steps" in proc.stderr


def test_config_explain_lists_every_section_with_docs(capsys):
    assert main(["config", "explain"]) == 0
    out = capsys.readouterr().out
    for key in ("model.size", "data.source", "train.steps", "cluster.hang_timeout_s", "checkpoint.every_steps",
                "memory.activations", "pipeline.schedule", "services.retriever.kind"):
        assert key in out
    assert "Training ranks" in out  # a field docstring made it through
