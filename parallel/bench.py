"""``trainmem bench pipeline [--quick] [--json]``: our 1F1B and V-Half executor beside
``torch.distributed.pipelining.Schedule1F1B`` in one run: 2 processes, gloo on CPU, the same GPT
split and microbatches. Reports median step time and measured per-rank peak saved-activation bytes
(both counted with the same rule: distinct non-parameter storages autograd saved)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("torch_1f1b", "ours_1f1b", "ours_vhalf")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        raise _UsageError(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_variant(name: str, rank: int, cfg: dict):
    import torch
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from trainmem.runtime.models import ModelConfig, build, lm_loss, split_into_stages

    from .executor import PipelineExecutor
    from .schedules import make_schedule, stage_layout

    mcfg = ModelConfig(size=cfg["size"], n_layer=cfg["n_layer"], seq_len=cfg["seq_len"])
    model = build(mcfg, seed=0)
    sched_name = "v-half" if name == "ours_vhalf" else "1f1b"
    layout = stage_layout(sched_name, 2, cfg["n_layer"])
    counts = {s: n for row in layout for s, n in row}
    stages = split_into_stages(model, [counts[s] for s in sorted(counts)])
    mine = {s: stages[s] for s, _ in layout[rank]}
    params = [p for mod in mine.values() for p in mod.parameters()]
    if name == "torch_1f1b":
        stage = PipelineStage(mine[rank], rank, 2, torch.device("cpu"))
        return Schedule1F1B(stage, n_microbatches=cfg["m"], loss_fn=lm_loss), params
    sched = make_schedule(sched_name, 2, cfg["m"])
    return PipelineExecutor(sched, rank, mine, lm_loss, timeout_s=120.0), params


def _torch_step(runner, params, rank: int, x, y) -> tuple[float, int]:
    from .stash import SavedBytesMeter

    with SavedBytesMeter(params) as meter:
        if rank == 0:
            runner.step(x)
            loss = float("nan")
        else:
            losses: list = []
            runner.step(target=y, losses=losses)
            loss = float(sum(float(v.detach()) for v in losses) / len(losses))
    return loss, meter.peak


def _worker(rank: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on shared cores: keep them from oversubscribing
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=dt.timedelta(seconds=120))
    try:
        runners = {name: _build_variant(name, rank, cfg) for name in VARIANTS}
        gen = torch.Generator().manual_seed(0)
        bsz, m, seq = cfg["mb_size"], cfg["m"], cfg["seq_len"]
        x = torch.randint(0, 256, (bsz * m, seq), generator=gen)
        y = torch.randint(0, 256, (bsz * m, seq), generator=gen)
        mbs = list(zip(x.chunk(m), y.chunk(m)))
        times: dict[str, list[float]] = {n: [] for n in VARIANTS}
        peaks: dict[str, int] = {n: 0 for n in VARIANTS}
        losses: dict[str, float] = {}
        total = cfg["warmup"] + cfg["steps"]
        for step in range(total):
            order = VARIANTS[step % 3:] + VARIANTS[: step % 3]  # rotate so drift hits all alike
            for name in order:
                runner, params = runners[name]
                for p in params:
                    p.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                if name == "torch_1f1b":
                    loss, peak = _torch_step(runner, params, rank, x, y)
                else:
                    stats = runner.step(mbs)
                    loss, peak = stats.loss, stats.peak_bytes
                dist.barrier()
                if step >= cfg["warmup"]:
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], peak)
                losses[name] = loss
            if rank == 0:
                Path(out_dir, "progress").write_text(str(step + 1))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"times": times, "peaks": peaks, "losses": losses}))
    finally:
        dist.destroy_process_group()


def _run(cfg: dict) -> list[dict]:
    import torch.multiprocessing as mp
    from rich.progress import Progress

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, cfg, out_dir)) for r in range(2)]
        for proc in procs:
            proc.start()
        total = cfg["warmup"] + cfg["steps"]
        deadline = time.monotonic() + cfg["timeout_s"]
        with Progress(transient=True) as bar:
            task = bar.add_task("pipeline benchmark (2 ranks, gloo)", total=total)
            while any(p.is_alive() for p in procs):
                if time.monotonic() > deadline:
                    for proc in procs:
                        proc.kill()
                    raise TimeoutError(f"benchmark ranks did not finish within {cfg['timeout_s']}s")
                prog = Path(out_dir, "progress")
                if prog.exists():
                    try:
                        bar.update(task, completed=int(prog.read_text() or 0))
                    except ValueError:
                        pass
                time.sleep(0.2)
        for r, proc in enumerate(procs):
            proc.join(timeout=5)
            if proc.exitcode != 0:
                raise RuntimeError(f"benchmark rank {r} exited with code {proc.exitcode}")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(2)]


def _summarize(ranks: list[dict], cfg: dict) -> dict:
    step = {}
    for name in VARIANTS:
        per_step = [max(a, b) for a, b in zip(ranks[0]["times"][name], ranks[1]["times"][name])]
        step[name] = statistics.median(per_step)
    peaks = {name: [r["peaks"][name] for r in ranks] for name in VARIANTS}
    return {
        "config": cfg,
        "step_s": {k: round(v, 5) for k, v in step.items()},
        "peak_bytes_per_rank": peaks,
        "loss_last_stage": {k: ranks[1]["losses"][k] for k in VARIANTS},
        "step_ratio_1f1b_vs_torch": round(step["ours_1f1b"] / step["torch_1f1b"], 4),
        "step_ratio_vhalf_vs_torch": round(step["ours_vhalf"] / step["torch_1f1b"], 4),
        "peak_ratio_1f1b_vs_torch": round(max(peaks["ours_1f1b"]) / max(peaks["torch_1f1b"]), 4),
        "vhalf_peak_ratio": round(max(peaks["ours_vhalf"]) / max(peaks["ours_1f1b"]), 4),
        "sim_vhalf_peak_ratio_by_p": _sim_ratios(cfg["m"]),
    }


def _sim_ratios(m: int) -> dict[str, float]:
    """The simulator's V-Half / 1F1B peak (M_B) at more ranks, for context: (p+2)//2 vs p."""
    from .schedules import make_schedule
    from .simulate import order_peak

    out = {}
    for p in (2, 4, 8, 16):
        mm = max(m, 2 * p)
        out[str(p)] = round(max(order_peak(make_schedule("v-half", p, mm))) / max(order_peak(make_schedule("1f1b", p, mm))), 4)
    return out


def _print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pipeline: 2 ranks, gloo, CPU")
    for col in ("variant", "median step s", "vs torch 1F1B", "peak bytes rank 0", "peak bytes rank 1"):
        table.add_column(col)
    base = res["step_s"]["torch_1f1b"]
    for name in VARIANTS:
        pk = res["peak_bytes_per_rank"][name]
        table.add_row(name, f"{res['step_s'][name]:.4f}", f"{res['step_s'][name] / base:.3f}", f"{pk[0]:,}", f"{pk[1]:,}")
    Console().print(table)
    print(f"step ratio ours 1F1B / torch 1F1B: {res['step_ratio_1f1b_vs_torch']} (target <= 1.05); "
          f"V-Half peak / 1F1B peak: {res['vhalf_peak_ratio']} (target <= 0.6)")
    print(f"simulated V-Half / 1F1B peak (M_B) by ranks p: {res['sim_vhalf_peak_ratio_by_p']}")


def main(argv: list[str]) -> int:
    ap = _Parser(prog="trainmem bench pipeline")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("-m", type=int, default=None, help="microbatches")
    try:
        args = ap.parse_args(argv)
    except _UsageError as exc:
        print(f"trainmem bench pipeline: {exc} (fix: --quick, --json, --steps N, -m M)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.quick:
        cfg = dict(size="tiny", n_layer=4, seq_len=16, mb_size=1, m=4, warmup=1, steps=1)
    else:
        cfg = dict(size="small", n_layer=4, seq_len=64, mb_size=2, m=8, warmup=1, steps=8)
    if args.steps:
        cfg["steps"] = args.steps
    if args.m:
        cfg["m"] = args.m
    if cfg["m"] < 1 or cfg["steps"] < 1:
        print("trainmem bench pipeline: -m and --steps must be >= 1", file=sys.stderr)
        return 2
    cfg["timeout_s"] = 300 if args.quick else 1800
    res = _summarize(_run(cfg), cfg)
    _print_table(res)
    if args.json:
        print(json.dumps(res))
    return 0
