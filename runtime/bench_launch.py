"""``trainmem bench launch``: start-up, failure detection and recovery, beside Ray Train.

Both sides train the same GPT on the same batches with 2 workers, checkpoint to disk every
``--every`` steps, and lose rank 1 to SIGKILL at ``--kill-step``. Each runs in a fresh child
process, so ``first_step_s`` includes interpreter start, imports and Ray start-up.
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


def run_ours(job: dict, work: Path) -> dict:
    toml = work / "job.toml"
    toml.write_text(
        f'[model]\nsize = "{job["model"]["size"]}"\nseq_len = {job["model"]["seq_len"]}\n'
        f'[train]\nsteps = {job["steps"]}\nbatch_size = {job["batch_size"]}\nlr = {job["lr"]}\nseed = {job["seed"]}\n'
        f'run_dir = "{work / "run"}"\n[cluster]\nworkers = {job["workers"]}\n'
        f'[checkpoint]\nevery_steps = {job["every_steps"]}\n'
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
    restored = next(e["step"] for e in events if e["event"] == "restored")
    return {"first_step_s": metrics[0]["time"] - t0, "detect_s": detect - kill, "recover_s": resumed - kill,
            "restored_step": restored, "lost_steps": job["kill_step"] - 1 - restored,
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
        (Path(tmp) / "ours").mkdir()
        (Path(tmp) / "raytrain").mkdir()
        with console.status("trainmem launch (kill rank 1 at step %d)..." % args.kill_step):
            ours = run_ours(job, Path(tmp) / "ours")
        with console.status("Ray Train TorchTrainer (same job)..."):
            theirs = run_raytrain(job, Path(tmp) / "raytrain")
    table = Table(title=f"launch: GPT {args.size}, 2 workers, SIGKILL rank 1 at step {args.kill_step}")
    for col in ("figure", "trainmem", "Ray Train", "trainmem / Ray Train"):
        table.add_column(col, justify="right")
    out = {"size": args.size, "steps": args.steps, "kill_step": args.kill_step, "every_steps": args.every}
    for key in ("first_step_s", "detect_s", "recover_s", "wall_s"):
        ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
        table.add_row(key, f"{ours[key]:.2f}", f"{theirs[key]:.2f}", f"{ratio:.2f}")
        out[key], out[f"raytrain_{key}"], out[f"ratio_{key}"] = round(ours[key], 3), round(theirs[key], 3), round(ratio, 3)
    for key in ("restored_step", "lost_steps"):
        table.add_row(key, str(ours[key]), str(theirs[key]), "")
        out[key], out[f"raytrain_{key}"] = ours[key], theirs[key]
    console.print(table)
    if args.json:
        print(json.dumps(out))
    return 0
