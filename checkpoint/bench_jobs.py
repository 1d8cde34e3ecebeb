"""Job-level figures of ``trainmem bench checkpoint``: real ``trainmem launch`` runs (child processes).

* a trainer SIGKILLed by itself (``--inject-failure``): steps lost and kill -> resumed, snapshots vs disk;
* 3 data-parallel replicas with and without a snapshot every step: the per-rank step overhead and
  the bytes each replica's writer captured (from the job's ``checkpoint.traffic`` events);
* a Ray node removed under a running job (``ray.cluster_utils.Cluster``, a node with a trainer and
  a holder): removal -> first step done after the restore, memory tier vs durable tier.

Nothing here imports the runtime: jobs are launched as the user launches them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MB = 1024 * 1024


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_job(path: Path, run_dir: Path, *, size: str, steps: int, workers: int, snapshot_every: int,
              every_steps: int, cpus: float = 1.0, batch: int = 4, placement: str = "PACK") -> Path:
    path.write_text(
        f'[model]\nsize = "{size}"\n[train]\nsteps = {steps}\nbatch_size = {batch}\nseed = 3\nrun_dir = "{run_dir}"\n'
        f'[cluster]\nworkers = {workers}\ncpus_per_worker = {cpus}\nhang_timeout_s = 60\nplacement = "{placement}"\n'
        f'[checkpoint]\nevery_steps = {every_steps}\nsnapshot_every = {snapshot_every}\n')
    return path


def launch(job: Path, *extra: str, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "trainmem.launch.cli", "launch", str(job), "--json", *extra],
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"trainmem launch {job} failed ({out.returncode}): {out.stderr[-800:]}")
    return out


def kill_job(size: str, steps: int, kill_step: int, snapshot_every: int, every_steps: int, tmp: Path) -> dict[str, Any]:
    """Rank 1 SIGKILLs itself at ``kill_step``: steps lost (done before the kill, missing from the restored
    state), kill -> state restored and kill -> first step after the restore."""
    name = f"kill-{snapshot_every}-{every_steps}"
    run = tmp / name
    launch(write_job(tmp / f"{name}.toml", run, size=size, steps=steps, workers=2, snapshot_every=snapshot_every,
                     every_steps=every_steps), "--inject-failure", f"rank=1,step={kill_step}")
    events, metrics = _jsonl(run / "events.jsonl"), _jsonl(run / "metrics.jsonl")
    first = {e["event"]: e for e in reversed(events)}  # earliest of each kind
    killed_at = first["failure_injected"]["time"]
    done_before = max(m["step"] for m in metrics if m["attempt"] == 0)
    restored = first.get("restored", {"step": 0, "time": float("nan"), "tier": "none"})
    return {"kill_to_restored_s": restored["time"] - killed_at, "kill_to_resumed_s": first["resumed"]["time"] - killed_at,
            "lost_steps": done_before - restored["step"], "tier": restored["tier"], "size": size,
            "killed": {k: first["failure_injected"][k] for k in ("rank", "step", "kind")},
            "detected": first["failure_detected"]["kind"]}


def replica_job(size: str, steps: int, tmp: Path) -> dict[str, Any]:
    """3 data-parallel replicas, a snapshot every step vs none (same job otherwise): per-rank overhead of
    the median step, and the share of the state each replica's writer captured."""
    out: dict[str, Any] = {}
    for snap in (0, 1):
        run = tmp / f"dp3-{snap}"
        launch(write_job(tmp / f"dp3-{snap}.toml", run, size=size, steps=steps, workers=3, snapshot_every=snap,
                         every_steps=0, cpus=0.5))
        times = [m["step_time_s"] for m in _jsonl(run / "metrics.jsonl")][2:]  # warm-up steps out
        out[f"step_s_{'snapshot' if snap else 'plain'}"] = statistics.median(times)
        if snap:
            traffic = {e["rank"]: e for e in _jsonl(run / "events.jsonl") if e["event"] == "checkpoint.traffic"}
            per = {r: t["captured"] / max(1, t["passes"]) for r, t in traffic.items()}
            whole = sum(per.values())
            out["capture_share_per_rank"] = {str(r): round(b / whole, 3) for r, b in sorted(per.items())}
            out["traffic_per_state_byte"] = round(sum(t["captured"] + t["parity"] + t["shipped"] + t["copied_extra"]
                                                      for t in traffic.values()) / max(1, max(t["passes"] for t in
                                                      traffic.values())) / whole, 3)
    out["overhead_ratio_3dp"] = out["step_s_snapshot"] / out["step_s_plain"] - 1
    return out


def node_loss_jobs(size: str, steps: int, remove_at: int, tmp: Path) -> dict[str, Any]:
    """Remove the node of rank 1 (its trainer and its holder die) under a running job on a 3-node local
    cluster: seconds from the removal to the first step done after the restore, memory vs durable.

    Runs in a child process: it starts and owns its own Ray cluster, whatever this process is connected to.
    """
    out = subprocess.run([sys.executable, "-m", "trainmem.checkpoint.bench_jobs", size, str(steps), str(remove_at),
                          str(tmp)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"node-loss jobs failed ({out.returncode}): {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _node_loss_here(size: str, steps: int, remove_at: int, tmp: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * _MB,
                                                              "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1, object_store_memory=100 * _MB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="trainmem-bench", log_to_driver=False, logging_level="ERROR")
    try:
        out = {}
        for tier, (snap, every) in {"memory": (1, 0), "durable": (0, 5)}.items():
            out[tier] = _remove_node_under(cluster, tmp / f"node-{tier}", size, steps, remove_at, snap, every)
            for _ in range(3 - len([n for n in cluster.list_all_nodes() if n is not cluster.head_node])):
                cluster.add_node(num_cpus=1, object_store_memory=100 * _MB)
            cluster.wait_for_nodes()
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node_of(cluster, pid: int):
    """The simulated node a worker process belongs to: the one whose raylet started it."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(pid).parent().pid
    for node in cluster.list_all_nodes():
        if any(p.process.pid == raylet for p in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])):
            return node
    raise RuntimeError(f"no node of the cluster runs the raylet {raylet} that started pid {pid}")


def _remove_node_under(cluster, run: Path, size: str, steps: int, remove_at: int, snap: int, every: int) -> dict:
    job = write_job(run.with_suffix(".toml"), run, size=size, steps=steps, workers=2, snapshot_every=snap,
                    every_steps=every, placement="SPREAD")
    proc = subprocess.Popen([sys.executable, "-m", "trainmem.launch.cli", "launch", str(job), "--json",
                             "--address", cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not (m := _jsonl(run / "metrics.jsonl")) or m[-1]["step"] < remove_at:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job did not reach step {remove_at}: {proc.stderr.read()[-500:]}")
        time.sleep(0.05)
    pid = next(e for e in _jsonl(run / "events.jsonl") if e["event"] == "workers_started")["pids"][1]
    node = _node_of(cluster, pid)
    removed_at = time.time()
    cluster.remove_node(node)
    cluster.add_node(num_cpus=1, object_store_memory=100 * _MB)  # a replacement node joins
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed after the node loss ({proc.returncode}): {err[-800:]}")
    events, metrics = _jsonl(run / "events.jsonl"), _jsonl(run / "metrics.jsonl")
    restored = next(e for e in events if e["event"] == "restored" and e["time"] >= removed_at)
    resumed = next(mm for mm in metrics if mm["time"] > restored["time"])
    done_before = max(mm["step"] for mm in metrics if mm["time"] < removed_at)
    return {"recover_s": resumed["time"] - removed_at, "tier": restored["tier"], "restored_step": restored["step"],
            "lost_steps": max(0, done_before - restored["step"]), "cpus": os.cpu_count()}


if __name__ == "__main__":
    print(json.dumps(_node_loss_here(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
