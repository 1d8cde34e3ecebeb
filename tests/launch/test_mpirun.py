"""``mpirun -n 2 trainmem launch JOB --launcher mpirun``: MPI starts the Ray cluster (token auth, loopback),
rank 0 runs the job, a killed trainer recovers bitwise, every rank exits 0 and leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trainmem.runtime.runlog import read_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MPIRUN = [str(Path(sys.executable).parent / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2"]
JOB = """[model]\nsize = "tiny"\n[train]\nsteps = 12\nbatch_size = 8\nlr = 3e-3\nseed = 7\nrun_dir = "{run}"
[cluster]\nworkers = 2\nhang_timeout_s = 10.0\n[checkpoint]\nevery_steps = 5\nsnapshot_every = 1\n"""


def _job(tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(JOB.format(run=tmp_path / name))
    return path


def _trainmem(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainmem.launch.cli", *args]


def _listeners(pid: int) -> set[tuple[str, str, int]]:
    try:
        tree = {p.pid: p for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:
                out.add((conn.laddr.ip, tree[conn.pid].name(), conn.pid))
            except psutil.NoSuchProcess:
                pass
    return out


def test_mpirun_launch_recovers_a_killed_trainer_bitwise(tmp_path):
    clean = subprocess.run(_trainmem("launch", str(_job(tmp_path, "embedded")), "--json"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    job = _job(tmp_path, "mpi")
    proc = subprocess.Popen([*MPIRUN, *_trainmem("launch", str(job), "--launcher", "mpirun", "--json",
                                                 "--inject-failure", "rank=1,step=8,kind=kill")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listeners(proc.pid)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    assert proc.returncode == 0, err[-3000:]  # mpirun exits 0 only when every rank did
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["params_sha256"] == json.loads(clean.stdout.strip().splitlines()[-1])["params_sha256"]
    (rec,) = summary["recoveries"]
    assert rec["ranks"] == [1] and rec["tier"] == "memory" and rec["lost_steps"] == 0
    events = read_jsonl(tmp_path / "mpi" / "events.jsonl")
    address = events[0]["ray_address"]
    assert address.startswith("127.0.0.1:"), "rank 0's head, on loopback"
    # One Ray node per MPI rank: rank 1's joined rank 0's head (rank 0 waited for both before training).
    assert "Ray runtime started" in (tmp_path / "mpi" / "logs" / "mpi-node-1.log").read_text()
    raylets = {pid for _, name, pid in seen if name == "raylet"}
    assert len(raylets) == 2 and any(name == "gcs_server" for _, name, _ in seen), seen
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if "tm-mpi-" in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {left}"
    spec = json.loads((tmp_path / "mpi" / "spec.json").read_text())
    assert spec["cluster"]["address"] == "", "a --resume must not try to join the finished job's head"


def test_a_usage_error_under_mpirun_exits_2_on_every_rank(tmp_path):
    job = _job(tmp_path, "bad")
    proc = subprocess.run([*MPIRUN, *_trainmem("launch", str(job), "--launcher", "mpirun", "--address",
                                               "127.0.0.1:1")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("--launcher mpirun starts its own Ray cluster") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
