"""A bare `trainmem launch` (no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER in the environment) opens no port
beyond loopback: Ray's GCS, raylet, workers and agents, and rank 0's rendezvous store included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _listeners(pid: int) -> dict[tuple[str, int], str]:
    """{(address, port): process name} for every TCP socket in LISTEN state in ``pid``'s process tree."""
    try:
        tree = {p.pid: p for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:
                out[(conn.laddr.ip, conn.laddr.port)] = tree[conn.pid].name()
            except psutil.NoSuchProcess:
                pass
    return out


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def _interruptible() -> None:
    """SIGINT as at a terminal. A suite started in the background (nohup, `make test &`, some CI runners)
    inherits SIGINT ignored; the launch then ignored the interrupt below and trained on for the 60 s
    until its kill (75-86 s of wall and a minute of two trainers' CPU in the suite, 10 s alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_bare_launch_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainmem.launch.cli", "launch", "examples/tiny.toml",
                             "--steps", "100000", "--run-dir", str(run)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)
    seen: dict[tuple[str, int], str] = {}
    try:
        deadline = time.monotonic() + 180
        steps = 0
        while steps < 20:  # the process group is formed and training: every listener exists by now
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the job did not reach step 20"
            seen.update(_listeners(proc.pid))
            metrics = run / "metrics.jsonl"
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                steps = json.loads(lines[-1])["step"] if lines else 0
            time.sleep(0.5)
        seen.update(_listeners(proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    assert rc == 130, f"the launch did not stop on SIGINT within 60 s (exit {rc})"
    names = set(seen.values())
    assert {"gcs_server", "raylet"} <= names, f"too few listeners seen to mean anything: {seen}"
    assert any("Worker" in n for n in names), f"no rank's listener seen (rendezvous store, gloo): {seen}"
    exposed = {k: v for k, v in seen.items() if not _loopback(k[0])}
    assert not exposed, f"listening beyond loopback: {exposed}"
