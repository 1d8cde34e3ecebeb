"""``trainmem bench launch``: start-up, failure detection and recovery, beside Ray Train.

Both sides train the same GPT on the same batches with 2 workers, checkpoint to disk every
``--every`` steps, and lose rank 1 to SIGKILL at ``--kill-step``. Each runs in a fresh child
process, so ``first_step_s`` includes interpreter start, imports and Ray start-up. Ours runs twice,
with in-memory snapshots every step: the lost rank replaced by a cold start ("cold") and by a warm
spare ("spare"); Ray Train restarts its whole group from its last reported checkpoint.
Then the durable tier's save/restore throughput to the local disk and to S3 (``s3_save_gbps``,
``local_save_gbps``, ...; see :mod:`trainmem.checkpoint.bench_storage`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trainmem.checkpoint.bench_storage import durable_throughput, throughput_table

from .runlog import read_jsonl


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainmem bench launch")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke test)")
    p.add_argument("--size", default="small", help="GPT size (default small)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--kill-step", type=int, default=17)
    p.add_argument("--every", type=int, default=5, help="disk checkpoint every N steps, both sides")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.kill_step, args.every = "tiny", 12, 7, 5
    return args


def _job(args: argparse.Namespace) -> dict:
    return {"model": {"size": args.size, "seq_len": 128}, "seed": 0, "lr": 1e-3, "batch_size": 4,
            "steps": args.steps, "every_steps": args.every, "workers": 2, "kill_rank": 1,
            "kill_step": args.kill_step}


def run_ours(job: dict, work: Path, spares: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    toml = work / "job.toml"
    toml.write_text(
        f'[model]\nsize = "{job["model"]["size"]}"\nseq_len = {job["model"]["seq_len"]}\n'
        f'[train]\nsteps = {job["steps"]}\nbatch_size = {job["batch_size"]}\nlr = {job["lr"]}\nseed = {job["seed"]}\n'
        f'run_dir = "{work / "run"}"\n[cluster]\nworkers = {job["workers"]}\nspares = {spares}\n'
        f'[checkpoint]\nevery_steps = {job["every_steps"]}\nsnapshot_every = 1\n'
    )
    cmd = [sys.executable, "-m", "trainmem.launch.cli", "launch", str(toml), "--json",
           "--inject-failure", f"rank={job['kill_rank']},step={job['kill_step']},kind=kill"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"trainmem launch failed ({proc.returncode}): {proc.stderr[-800:]}")
    events = read_jsonl(work / "run" / "events.jsonl")
    metrics = read_jsonl(work / "run" / "metrics.jsonl")
    kill = next(e["time"] for e in events if e["event"] == "failure_injected")
    detect = next(e["time"] for e in events if e["event"] == "failure_detected")
    resumed = next(m["time"] for m in metrics if m["attempt"] > 0)
    restored = next(e for e in events if e["event"] == "restored")
    replaced = next((e for e in events if e["event"] == "ranks_replaced"), {})
    return {"first_step_s": metrics[0]["time"] - t0, "detect_s": detect - kill, "recover_s": resumed - kill,
            "restored_step": restored["step"], "restored_tier": restored["tier"],
            "replacement": replaced.get("source", {}).get(str(job["kill_rank"]), "group restart"),
            "lost_steps": job["kill_step"] - 1 - restored["step"],
            "wall_s": time.time() - t0, "params_sha256": json.loads(proc.stdout.strip().splitlines()[-1])["params_sha256"]}


def run_raytrain(job: dict, work: Path) -> dict:
    (work / "job.json").write_text(json.dumps(job))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainmem.runtime.bench_raytrain", str(work / "job.json"), str(work)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"Ray Train run failed ({proc.returncode}): {proc.stderr[-800:]}")
    timeline = read_jsonl(work / "timeline.jsonl")
    kill = next(e["time"] for e in timeline if e["event"] == "kill")
    detect = next((e["time"] for e in timeline if e["event"] == "detected"), float("nan"))
    first = next(e["time"] for e in timeline if e["event"] == "step")
    # A checkpoint reported just before the kill may not be registered yet: Ray Train then
    # restarts from step 0 (no "restored" line). Either way, resumption is the first step
    # finished by the restarted group.
    restored = next((e for e in timeline if e["event"] == "restored"), None)
    restart_time = restored["time"] if restored else (detect if detect == detect else kill)
    resumed = next(e["time"] for e in timeline if e["event"] == "step" and e["time"] > restart_time)
    return {"first_step_s": first - t0, "detect_s": detect - kill, "recover_s": resumed - kill,
            "wall_s": time.time() - t0, "restored_step": restored["step"] if restored else 0,
            "lost_steps": job["kill_step"] - 1 - (restored["step"] if restored else 0)}


def main(argv: list[str]) -> int:
    args = _args(argv)
    console = Console(stderr=args.json)
    job = _job(args)
    with tempfile.TemporaryDirectory(prefix="trainmem-bench-launch-") as tmp:
        (Path(tmp) / "raytrain").mkdir()
        with console.status("trainmem launch, cold replacement (kill rank 1 at step %d)..." % args.kill_step):
            cold = run_ours(job, Path(tmp) / "cold")
        with console.status("trainmem launch, one warm spare..."):
            spare = run_ours(job, Path(tmp) / "spare", spares=1)
        with console.status("Ray Train TorchTrainer (same job)..."):
            theirs = run_raytrain(job, Path(tmp) / "raytrain")
    if cold["params_sha256"] != spare["params_sha256"]:
        raise RuntimeError("the cold and spare runs ended with different parameters: recovery is not bitwise")
    table = Table(title=f"launch: GPT {args.size}, 2 workers, SIGKILL rank 1 at step {args.kill_step} "
                        f"(ours: snapshots every step; Ray Train: checkpoint every {args.every})")
    for col in ("figure", "trainmem cold", "trainmem spare", "Ray Train", "cold / RT", "spare / RT"):
        table.add_column(col, justify="right")
    out = {"size": args.size, "steps": args.steps, "kill_step": args.kill_step, "every_steps": args.every,
           "replacement": {"cold": cold["replacement"], "spare": spare["replacement"]},
           "restored_tier": cold["restored_tier"]}
    for key in ("first_step_s", "detect_s", "recover_s", "wall_s"):
        rt = theirs[key]
        table.add_row(key, f"{cold[key]:.2f}", f"{spare[key]:.2f}", f"{rt:.2f}",
                      f"{cold[key] / rt:.2f}" if rt else "-", f"{spare[key] / rt:.2f}" if rt else "-")
        out[key], out[f"raytrain_{key}"] = round(cold[key], 3), round(rt, 3)
        out[f"ratio_{key}"] = round(cold[key] / rt, 3) if rt else None
    out["recover_s_cold"], out["recover_s_spare"] = round(cold["recover_s"], 3), round(spare["recover_s"], 3)
    out["ratio_recover_s_spare"] = round(spare["recover_s"] / theirs["recover_s"], 3) if theirs["recover_s"] else None
    for key in ("restored_step", "lost_steps"):
        table.add_row(key, str(cold[key]), str(spare[key]), str(theirs[key]), "", "")
        out[key], out[f"raytrain_{key}"] = max(cold[key], spare[key]), theirs[key]
    console.print(table)
    with console.status("durable tier: save and restore to the local disk and to S3 (SeaweedFS)..."):
        storage = durable_throughput(args.size)
    out.update(storage)
    console.print(throughput_table(storage))
    if args.json:
        print(json.dumps(out))
    return 0
