"""``mpirun -n N trainmem launch JOB.toml --launcher mpirun``: MPI starts the Ray cluster, Ray runs the job.

Sites that hand out nodes through MPI get the same job as on Ray: MPI rank 0 starts a Ray head
(token auth, a fresh token) and broadcasts its address and token over MPI; every other MPI rank
starts a Ray node joined to it (one per rank; several ranks on one host split its CPUs); rank 0
waits until all nodes are in, then runs the controller against that cluster (placement, holders,
failure handling are unchanged). When the job ends, rank 0 broadcasts the exit code; every rank
stops its own Ray node (only the processes it started: other Ray clusters on the host are left
alone) and exits with that code (0 for a finished job).

Messages travel as JSON bytes (no pickle). Waits poll non-blocking MPI requests with a sleep, so a
rank waiting hours for the job's end costs no CPU (Open MPI's blocking calls spin), and every
wait but the job itself has a timeout that names who was waited on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

import trainmem

TOKEN_ENV = {"RAY_AUTH_MODE": "token"}
NODE_START_TIMEOUT_S = 120.0


class MpiLaunchError(RuntimeError):
    """The MPI bootstrap failed; the message names the rank and what to do."""


def world():
    """MPI_COMM_WORLD, or MpiLaunchError saying how to get one."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MpiLaunchError(f"--launcher mpirun needs mpi4py ({e}); install trainmem's dependencies") from None
    return MPI.COMM_WORLD


def _wait(request, what: str, timeout_s: float | None) -> None:
    """Poll an MPI request (no busy wait); ``timeout_s=None`` waits as long as the job runs."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = 0.01
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise MpiLaunchError(f"waited {timeout_s:g}s for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def bcast_json(comm, obj: Any = None, *, what: str, timeout_s: float | None) -> Any:
    """Rank 0's ``obj`` on every rank, sent as JSON bytes."""
    root = comm.Get_rank() == 0
    data = json.dumps(obj).encode() if root else b""
    size = np.array([len(data)], dtype=np.int64)
    _wait(comm.Ibcast(size, root=0), what, timeout_s)
    buf = np.frombuffer(bytearray(data), dtype=np.uint8) if root else np.empty(int(size[0]), dtype=np.uint8)
    _wait(comm.Ibcast(buf, root=0), what, timeout_s)
    return json.loads(buf.tobytes().decode())


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Host:
    """Where this MPI rank runs: how many ranks share its host and which of them it is (one collective call,
    made by every rank at start, before any rank waits on another)."""

    def __init__(self, comm):
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.ranks, self.local_rank = local.Get_size(), local.Get_rank()
        self.single = self.ranks == comm.Get_size()
        local.Free()

    def node_ip(self) -> str:
        """127.0.0.1 when every rank is on this host (loopback: nothing else listens); else this host's address."""
        if self.single:
            return "127.0.0.1"
        if not trainmem.allow_cluster_addresses():
            raise MpiLaunchError("MPI ranks span several hosts, which needs Ray's cluster mode, but "
                                 f"{trainmem.RAY_CLUSTER_ENV}=0 is set (fix: unset it or set it to 1)")
        from ray._private.services import get_node_ip_address

        return get_node_ip_address()

    def resources(self) -> list[str]:
        """This node's share of the host: its CPUs split over the ranks there, its GPUs to the first of them."""
        cpus = max(1, (os.cpu_count() or 1) // self.ranks)
        return [f"--num-cpus={cpus}"] + (["--num-gpus=0"] if self.local_rank > 0 else [])


class RayNode:
    """One ``ray start --block`` of this MPI rank, in its own session and temp dir, stopped by this rank."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: str):
        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/tm-mpi-")  # short: Ray's socket paths have a length limit
        self.log = open(log_path, "ab")
        # Ray's CLI through this interpreter: the `ray` script need not be on PATH or in this venv's bin.
        self.proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                                      "--disable-usage-stats",
                                      f"--temp-dir={self.temp_dir}", *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the node's process group (ray start, GCS, raylet, workers), then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
        for pid in _pids_mentioning(self.temp_dir):  # processes that left the group (setsid) but are this node's
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_env(token: str) -> dict[str, str]:
    """The environment of this rank's Ray node: token auth on; Ray's multi-node mode on (its CLI refuses to join
    a node otherwise; every node is given its address explicitly, 127.0.0.1 on one host, so nothing binds
    wider); and not an MPI process (no OMPI_/PMIX_ variables: a Ray worker that imports mpi4py must not try
    to join this MPI job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    return {**env, **TOKEN_ENV, "RAY_AUTH_TOKEN": token, trainmem.RAY_CLUSTER_ENV: "1"}


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _wait_for_port(ip: str, port: int, node: RayNode, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.alive():
            raise MpiLaunchError(f"the Ray head on MPI rank 0 exited (code {node.proc.returncode}); see its log")
        try:
            socket.create_connection((ip, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.2)
    raise MpiLaunchError(f"the Ray head on MPI rank 0 did not listen on {ip}:{port} within {timeout_s:g}s")


def _wait_for_nodes(n: int, timeout_s: float) -> None:
    """Rank 0 (connected to the head): block until ``n`` nodes are alive, naming how many came."""
    import ray

    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= n:
            return
        time.sleep(0.2)
    raise MpiLaunchError(f"{alive} of {n} Ray nodes joined within {timeout_s:g}s (one per MPI rank); "
                         "the missing ranks' node logs are in <run_dir>/logs/mpi-node-<rank>.log")


def launch(prepare: Callable[[], Any], run: Callable[[Any, str], int], log_dir: Callable[[Any], str],
           fail: Callable[[str], int]) -> int:
    """The whole mpirun launch, on every MPI rank; returns this rank's exit code.

    ``prepare()`` (rank 0 only) parses and validates the job, raising a usage error; ``run(spec,
    address)`` runs the controller against the Ray cluster at ``address`` and returns the exit code.
    """
    comm = world()
    rank, host = comm.Get_rank(), Host(comm)
    return _rank0(comm, host, prepare, run, log_dir, fail) if rank == 0 else _other_rank(comm, host, rank)


def _rank0(comm, host: Host, prepare, run, log_dir, fail) -> int:
    try:
        spec = prepare()
    except Exception as e:  # a usage error: every rank exits 2, rank 0 says why
        bcast_json(comm, {"exit": 2}, what="the job to start", timeout_s=60)
        return fail(str(e))
    code, started, head = 1, False, None
    try:
        logs = log_dir(spec)
        os.makedirs(logs, exist_ok=True)
        ip = host.node_ip()
        port = _free_port(ip)
        token = secrets.token_hex(32)
        os.environ.update(TOKEN_ENV, RAY_AUTH_TOKEN=token)  # this process joins the head as the job's driver
        head = RayNode(["--head", f"--node-ip-address={ip}", f"--port={port}", "--include-dashboard=false",
                        *host.resources()], _ray_env(token), os.path.join(logs, "mpi-node-0.log"))
        _wait_for_port(ip, port, head, NODE_START_TIMEOUT_S)
        address = f"{ip}:{port}"
        bcast_json(comm, {"address": address, "token": token, "logs": logs}, what="the Ray head address",
                   timeout_s=60)
        started = True
        import ray

        from trainmem.runtime.cluster import connect_ray
        connect_ray(dataclasses.replace(spec.cluster, address=address))  # the controller reuses this connection
        try:
            _wait_for_nodes(comm.Get_size(), NODE_START_TIMEOUT_S)
            code = run(spec, address)
        finally:
            ray.shutdown()
    except MpiLaunchError as e:
        print(f"trainmem launch --launcher mpirun: {e}", file=sys.stderr)
    finally:
        # The other ranks wait for exactly two messages (start, end); they get them whatever happened here.
        try:
            if not started:
                bcast_json(comm, {"exit": code}, what="the job to start", timeout_s=60)
            else:
                bcast_json(comm, {"exit": code}, what="the end of the job", timeout_s=60)
        finally:
            if head is not None:
                head.stop()
    return code


def _other_rank(comm, host: Host, rank: int) -> int:
    start = bcast_json(comm, what="MPI rank 0 to start the Ray head", timeout_s=None)
    if "exit" in start:
        return int(start["exit"])
    env = _ray_env(start["token"])
    node = RayNode([f"--address={start['address']}", f"--node-ip-address={host.node_ip()}", *host.resources()],
                   env, os.path.join(start["logs"], f"mpi-node-{rank}.log"))
    try:
        end = bcast_json(comm, what="MPI rank 0 to end the job", timeout_s=None)
    finally:
        node.stop()
    return int(end["exit"])
