"""`cluster.address` joins an existing Ray cluster (token auth on) instead of starting one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    """A head started the way users start one (`ray start --head`), token auth on, on loopback.

    It gets its own --temp-dir so that tearing it down kills only its processes (`ray stop`
    would stop every Ray cluster on the machine).
    """
    temp_dir = tempfile.mkdtemp(prefix="/tmp/tmh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                   check=True, capture_output=True, timeout=120, env=env)
    yield f"127.0.0.1:{port}"
    for pid in _pids_mentioning(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


def _pids_mentioning(text):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _launch(address, run_dir, auth_mode):
    env = dict(os.environ, RAY_AUTH_MODE=auth_mode)
    cmd = [sys.executable, "-m", "trainmem.launch.cli", "launch", "examples/tiny.toml", "--steps", "6",
           "--address", address, "--run-dir", str(run_dir), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def test_launch_joins_an_existing_cluster(head, tmp_path):
    proc = _launch(head, tmp_path / "run", "token")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 6
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[0]["ray_address"] == head


def test_unreachable_cluster_is_one_clear_line(tmp_path):
    proc = _launch("127.0.0.1:1", tmp_path / "run", "token")
    assert proc.returncode == 1
    assert "cannot join Ray at cluster.address='127.0.0.1:1'" in proc.stderr
    assert "Traceback" not in proc.stderr
