"""The real `trainmem serve` as a subprocess (its own session, so a kill takes Ray's processes too)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    def __init__(self, toml: Path, *extra: str, timeout_s: float = 240.0):
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainmem.launch.cli", "serve", str(toml), *extra], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would stall the service
        self.url = self.token_line = ""
        deadline = time.monotonic() + timeout_s
        while not self.token_line:
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"trainmem serve did not come up in {timeout_s}s:\n{''.join(self.lines[-30:])}")
            if line is None:
                raise RuntimeError(f"trainmem serve exited {self.proc.wait()}:\n{''.join(self.lines[-30:])}")
            if m := re.search(r"memory services at (http://\S+)", line):
                self.url = m.group(1)
            if "trainmem serve: token:" in line:
                self.token_line = line.strip()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    @property
    def token_path(self) -> Path:
        return Path(re.search(r" in (\S+)", self.token_line).group(1))

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to `trainmem serve` itself: it shuts Serve down cleanly (replicas save their index)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole session: the CLI, the Ray head and every replica die at once."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        # Ray's processes share the session; wait until none is left.
        deadline = time.monotonic() + 30
        while _session_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)


def serve_processes_env(root_pid: int, name: str) -> list[tuple[str, str | None]]:
    """(process title, its ``name`` environment variable) per Ray Serve process below ``root_pid``: one pair
    per process, so replicas that share a title are each seen."""
    import psutil

    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if title.startswith(("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor")):
                found.append((title.split()[0], proc.environ().get(name)))
        except psutil.Error:  # gone meanwhile
            continue
    return found


def _session_alive(sid: int) -> bool:
    out = subprocess.run(["ps", "-o", "sid=", "-e"], capture_output=True, text=True).stdout.split()
    return str(sid) in out
