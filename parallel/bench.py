"""``trainmem bench pipeline [--quick] [--json]``: our executor beside torch.distributed.pipelining in
the same run, gloo on CPU, the same GPT, split and microbatches.

- p = 2 (2 processes): torch ``Schedule1F1B`` vs our 1F1B and V-Half.
- p = 4 (4 processes): torch ``Schedule1F1B`` and ``ScheduleZBVZeroBubble`` vs our 1F1B, ZB-V,
  V-Half, V-Min and 1F1B with PipeOffload's selective offload (stashes chosen by lifespan from
  the layer costs and the copy bandwidth measured at start, the same on every rank); the simulator's step time, from per-layer costs measured in the same processes
  (all ranks profiling at once, so under the same core sharing) and a measured send latency, is
  set beside the measured one.

Step time: median over timed steps of the slowest rank, variants rotated every step so drift hits
all alike. Peak memory: most bytes of distinct saved non-parameter storages (the step's inputs and
targets excluded) held at once per rank: our executor's stash ledger, torch's runs counted by
``SavedBytesMeter`` with the same rule through saved-tensor hooks.
"""

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

VARIANTS = {2: ("torch_1f1b", "ours_1f1b", "ours_vhalf"),
            4: ("torch_1f1b", "torch_zbv", "ours_1f1b", "ours_zbv", "ours_vhalf", "ours_vmin", "ours_1f1b_offload")}
_SCHEDULE = {"torch_1f1b": "1f1b", "torch_zbv": "zb-v", "ours_1f1b": "1f1b", "ours_zbv": "zb-v",
             "ours_vhalf": "v-half", "ours_vmin": "v-min", "ours_1f1b_offload": "1f1b"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        raise _UsageError(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(cfg: dict):
    from trainmem.runtime.models import ModelConfig, build

    return build(ModelConfig(size=cfg["size"], n_layer=cfg["n_layer"], seq_len=cfg["seq_len"]), seed=0)


def _build_variant(name: str, rank: int, p: int, cfg: dict, schedule=None):
    import torch
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleZBVZeroBubble

    from trainmem.runtime.models import lm_loss, split_into_stages

    from .executor import PipelineExecutor
    from .schedules import make_schedule, stage_layout

    sched_name = _SCHEDULE[name]
    layout = stage_layout(sched_name, p, cfg["n_layer"])
    counts = {s: n for row in layout for s, n in row}
    stages = split_into_stages(_model(cfg), [counts[s] for s in sorted(counts)])
    mine = {s: stages[s] for s, _ in layout[rank]}
    params = [q for mod in mine.values() for q in mod.parameters()]
    n_stages = len(counts)
    if name.startswith("torch"):
        cpu = torch.device("cpu")
        pipe = [PipelineStage(mine[s], s, n_stages, cpu) for s, _ in layout[rank]]
        kind = Schedule1F1B if name == "torch_1f1b" else ScheduleZBVZeroBubble
        runner = kind(pipe[0] if len(pipe) == 1 else pipe, n_microbatches=cfg["m"], loss_fn=lm_loss)
        return runner, params, sorted(mine)
    sched = schedule or make_schedule(sched_name, p, cfg["m"])
    return PipelineExecutor(sched, rank, mine, lm_loss, timeout_s=300.0), params, sorted(mine)


def _torch_step(runner, params, owned: list[int], n_stages: int, x, y) -> tuple[float, int]:
    from .stash import SavedBytesMeter

    kwargs: dict = {"return_outputs": False}
    args = (x,) if 0 in owned else ()
    losses: list = []
    if n_stages - 1 in owned:
        kwargs.update(target=y, losses=losses)
    with SavedBytesMeter(params, exclude=[x, y]) as meter:
        runner.step(*args, **kwargs)
    loss = float(sum(float(v.detach()) for v in losses) / len(losses)) if losses else float("nan")
    return loss, meter.peak


def _send_latency(rank: int, cfg: dict) -> float:
    """Half the median round trip of one activation between ranks 0 and 1 (the others idle)."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(cfg["mb_size"], cfg["seq_len"], _model_width(cfg))
    trips = []
    for _ in range(cfg["latency_trips"]):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        elif rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)
        trips.append(time.perf_counter() - t0)
    return statistics.median(trips) / 2


def _model_width(cfg: dict) -> int:
    from trainmem.runtime.models import ModelConfig

    return ModelConfig(size=cfg["size"], n_layer=cfg["n_layer"], seq_len=cfg["seq_len"]).d_model


def _profile(cfg: dict, x, y) -> list[dict]:
    """Per-layer costs of one microbatch, measured on every rank at once."""
    from dataclasses import asdict

    from trainmem.runtime.models import lm_loss

    from .costs import profile_layers

    model = _model(cfg)
    layers = [("embed", model.embed)] + [(f"block{i}", b) for i, b in enumerate(model.blocks)] + [("head", model.head)]
    costs = profile_layers(layers, lambda: lm_loss(model(x), y), exclude=[x, y], steps=cfg["profile_steps"])
    return [asdict(c) for c in costs]


def _selective_schedule(p: int, cfg: dict, layer_costs: list[dict], send_latency_s: float, x, y):
    """1F1B with selective offload, from the medians over ranks of the layer costs and of the copy
    bandwidth each rank measured (so every rank derives the same schedule)."""
    import torch.distributed as dist

    from trainmem.offload import CopyEngine

    from .costs import LayerCost
    from .offload_pass import selective_offload
    from .schedules import even_layers, make_schedule
    from .split import stage_costs
    from .stash import measure_copy_bandwidth

    layers = [LayerCost(**row) for row in layer_costs]
    split = even_layers(cfg["n_layer"], p)
    copier = CopyEngine("cpu")
    try:
        biggest = max(c.saved_bytes for c in stage_costs(layers, split))
        bandwidth = measure_copy_bandwidth(copier, biggest)
    finally:
        copier.close()
    gathered: list = [None] * p
    dist.all_gather_object(gathered, (layer_costs, bandwidth, send_latency_s))
    per_rank = [[LayerCost(**row) for row in g[0]] for g in gathered]
    layers = [LayerCost(name=rows[0].name, forward_s=statistics.median(c.forward_s for c in rows),
                        backward_s=statistics.median(c.backward_s for c in rows), saved_bytes=rows[0].saved_bytes)
              for rows in zip(*per_rank)]
    bandwidth = statistics.median(g[1] for g in gathered)
    comm = statistics.median(g[2] for g in gathered)
    sched = selective_offload(make_schedule("1f1b", p, cfg["m"]), stage_costs(layers, split, bandwidth),
                              copy_bytes_per_s=bandwidth, comm_s=comm)
    offloaded = sorted({(a.stage, a.mb) for acts in sched.ranks for a in acts if a.kind.name == "OFFLOAD"})
    return sched, {"copy_bytes_per_s": bandwidth, "offloaded_stashes": len(offloaded)}


def _worker(rank: int, p: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # p ranks on shared cores: keep each to one thread
    dist.init_process_group("gloo", rank=rank, world_size=p, timeout=dt.timedelta(seconds=300))
    try:
        variants = VARIANTS[p]
        gen = torch.Generator().manual_seed(0)
        bsz, m, seq = cfg["mb_size"], cfg["m"], cfg["seq_len"]
        x = torch.randint(0, 256, (bsz * m, seq), generator=gen)
        y = torch.randint(0, 256, (bsz * m, seq), generator=gen)
        mbs = list(zip(x.chunk(m), y.chunk(m)))
        extra: dict = {}
        selective = None
        if p == 4:
            dist.barrier()
            extra["layer_costs"] = _profile(cfg, *mbs[0])
            extra["send_latency_s"] = _send_latency(rank, cfg)
            selective, extra["offload"] = _selective_schedule(p, cfg, extra["layer_costs"], extra["send_latency_s"], *mbs[0])
        runners = {name: _build_variant(name, rank, p, cfg, selective if name == "ours_1f1b_offload" else None)
                   for name in variants}
        n_stages = {name: (2 if _SCHEDULE[name] in ("zb-v", "v-half", "v-min") else 1) * p for name in variants}
        times: dict[str, list[float]] = {n: [] for n in variants}
        peaks: dict[str, int] = {n: 0 for n in variants}
        losses: dict[str, float] = {}
        for step in range(cfg["warmup"] + cfg["steps"]):
            shift = step % len(variants)
            for name in variants[shift:] + variants[:shift]:
                runner, params, owned = runners[name]
                for q in params:
                    q.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                if name.startswith("torch"):
                    loss, peak = _torch_step(runner, params, owned, n_stages[name], x, y)
                else:
                    stats = runner.step(mbs)
                    loss, peak = stats.loss, stats.peak_bytes
                dist.barrier()
                if step >= cfg["warmup"]:
                    times[name].append(time.perf_counter() - t0)
                peaks[name] = max(peaks[name], peak)
                if n_stages[name] - 1 in owned:
                    losses[name] = loss
            if rank == 0:
                Path(out_dir, f"progress{p}").write_text(str(step + 1))
        Path(out_dir, f"p{p}-rank{rank}.json").write_text(json.dumps(
            {"times": times, "peaks": peaks, "losses": losses, **extra}))
    finally:
        dist.destroy_process_group()


def _run(p: int, cfg: dict, out_dir: str, bar) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, p, port, cfg, out_dir)) for r in range(p)]
    for proc in procs:
        proc.start()
    total = cfg["warmup"] + cfg["steps"]
    task = bar.add_task(f"pipeline benchmark ({p} ranks, gloo)", total=total)
    deadline = time.monotonic() + cfg["timeout_s"]
    while any(proc.is_alive() for proc in procs):
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            raise TimeoutError(f"benchmark ranks (p={p}) did not finish within {cfg['timeout_s']}s")
        prog = Path(out_dir, f"progress{p}")
        if prog.exists():
            try:
                bar.update(task, completed=int(prog.read_text() or 0))
            except ValueError:
                pass
        time.sleep(0.2)
    for r, proc in enumerate(procs):
        proc.join(timeout=5)
        if proc.exitcode != 0:
            raise RuntimeError(f"benchmark rank {r} of {p} exited with code {proc.exitcode}")
    return [json.loads(Path(out_dir, f"p{p}-rank{r}.json").read_text()) for r in range(p)]


def _step_times(ranks: list[dict], variants) -> dict[str, float]:
    return {name: statistics.median(max(per) for per in zip(*(r["times"][name] for r in ranks))) for name in variants}


def _summarize_p2(ranks: list[dict]) -> dict:
    step = _step_times(ranks, VARIANTS[2])
    peaks = {name: [r["peaks"][name] for r in ranks] for name in VARIANTS[2]}
    losses = {k: v for r in ranks for k, v in r["losses"].items()}
    return {
        "step_s": {k: round(v, 5) for k, v in step.items()},
        "peak_bytes_per_rank": peaks,
        "loss_last_stage": losses,
        "step_ratio_1f1b_vs_torch": round(step["ours_1f1b"] / step["torch_1f1b"], 4),
        "step_ratio_vhalf_vs_torch": round(step["ours_vhalf"] / step["torch_1f1b"], 4),
        "peak_ratio_1f1b_vs_torch": round(max(peaks["ours_1f1b"]) / max(peaks["torch_1f1b"]), 4),
        "vhalf_peak_ratio": round(max(peaks["ours_vhalf"]) / max(peaks["ours_1f1b"]), 4),
    }


def _predicted(ranks: list[dict], cfg: dict) -> tuple[dict[str, float], float]:
    """The simulator's step time per schedule from the layer costs every rank measured (median
    across ranks per layer) and the measured send latency."""
    from .costs import LayerCost
    from .schedules import even_layers, make_schedule
    from .split import predict

    per_rank = [[LayerCost(**row) for row in r["layer_costs"]] for r in ranks]
    layers = [LayerCost(name=rows[0].name, forward_s=statistics.median(c.forward_s for c in rows),
                        backward_s=statistics.median(c.backward_s for c in rows), saved_bytes=rows[0].saved_bytes)
              for rows in zip(*per_rank)]
    comm = statistics.median(r["send_latency_s"] for r in ranks)
    out = {}
    for name in VARIANTS[4]:
        if name == "ours_1f1b_offload":
            continue  # predict() knows no copy times; sim_step_error_p4 is 1F1B's
        sched = make_schedule(_SCHEDULE[name], 4, cfg["m"])
        out[name] = predict(sched, layers, even_layers(cfg["n_layer"], sched.n_stages), comm_s=comm).makespan
    return out, comm


def _summarize_p4(ranks: list[dict], cfg: dict) -> dict:
    step = _step_times(ranks, VARIANTS[4])
    peaks = {name: [r["peaks"][name] for r in ranks] for name in VARIANTS[4]}
    predicted, comm = _predicted(ranks, cfg)
    errors = {name: round(predicted[name] / step[name] - 1, 4) for name in predicted if name.startswith("ours")}
    return {
        "step_s": {k: round(v, 5) for k, v in step.items()},
        "predicted_step_s": {k: round(v, 5) for k, v in predicted.items()},
        "sim_step_error_by_variant": errors,
        "send_latency_s": round(comm, 6),
        "peak_bytes_per_rank": peaks,
        "loss_last_stage": {k: v for r in ranks for k, v in r["losses"].items()},
        "step_ratio_zbv_vs_torch": round(step["ours_zbv"] / step["torch_zbv"], 4),
        "peak_ratio_1f1b_vs_torch": round(max(peaks["ours_1f1b"]) / max(peaks["torch_1f1b"]), 4),
        "step_ratio_1f1b_vs_torch_p4": round(step["ours_1f1b"] / step["torch_1f1b"], 4),
        "vhalf_peak_ratio_p4": round(max(peaks["ours_vhalf"]) / max(peaks["ours_1f1b"]), 4),
        "vmin_peak_ratio_p4": round(max(peaks["ours_vmin"]) / max(peaks["ours_1f1b"]), 4),
        "sim_step_error_p4": round(abs(errors["ours_1f1b"]), 4),
        "offload": ranks[0]["offload"],
        "offload_peak_ratio_p4": round(max(peaks["ours_1f1b_offload"]) / max(peaks["ours_1f1b"]), 4),
        "offload_step_ratio_p4": round(step["ours_1f1b_offload"] / step["ours_1f1b"], 4),
    }


def _print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for p in (2, 4):
        part = res[f"p{p}"]
        table = Table(title=f"pipeline: {p} ranks, gloo, CPU")
        cols = ["variant", "median step s", "vs torch 1F1B"] + (["simulated s"] if p == 4 else [])
        for col in cols + [f"peak bytes rank {r}" for r in range(p)]:
            table.add_column(col)
        base = part["step_s"]["torch_1f1b"]
        for name in VARIANTS[p]:
            sim = [f"{part['predicted_step_s'][name]:.4f}" if name in part["predicted_step_s"] else "-"] if p == 4 else []
            table.add_row(name, f"{part['step_s'][name]:.4f}", f"{part['step_s'][name] / base:.3f}", *sim,
                          *(f"{b:,}" for b in part["peak_bytes_per_rank"][name]))
        console.print(table)
    print(f"p=4: ours 1F1B / torch 1F1B step {res['step_ratio_1f1b_vs_torch_p4']} (target <= 1.05); "
          f"V-Half / 1F1B peak {res['vhalf_peak_ratio_p4']} (<= 0.8, theory 0.75); V-Min / 1F1B peak "
          f"{res['vmin_peak_ratio_p4']} (<= 0.55, theory 0.5); simulated vs measured 1F1B step "
          f"{res['sim_step_error_p4']:.1%} off (<= 15%); 1F1B selective offload / 1F1B peak "
          f"{res['offload_peak_ratio_p4']} (<= 0.35), step {res['offload_step_ratio_p4']} (<= 1.15)")
    print(f"p=2: ours 1F1B / torch 1F1B step {res['step_ratio_1f1b_vs_torch']}; V-Half / 1F1B peak "
          f"{res['vhalf_peak_ratio']} (theory 1.0 at p=2)")


def main(argv: list[str]) -> int:
    ap = _Parser(prog="trainmem bench pipeline")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("-m", type=int, default=None, help="microbatches (>= 8 keeps ZB-V bubble-free at p=4)")
    try:
        args = ap.parse_args(argv)
    except _UsageError as exc:
        print(f"trainmem bench pipeline: {exc} (fix: --quick, --json, --steps N, -m M)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.quick:
        cfg = dict(size="tiny", n_layer=8, seq_len=16, mb_size=1, m=8, warmup=1, steps=1, profile_steps=1,
                   latency_trips=3)
    else:
        cfg = dict(size="small", n_layer=8, seq_len=64, mb_size=2, m=8, warmup=1, steps=6, profile_steps=3,
                   latency_trips=20)
    if args.steps:
        cfg["steps"] = args.steps
    if args.m:
        cfg["m"] = args.m
    if cfg["m"] < 1 or cfg["steps"] < 1:
        print("trainmem bench pipeline: -m and --steps must be >= 1", file=sys.stderr)
        return 2
    cfg["timeout_s"] = 300 if args.quick else 3600
    from rich.progress import Progress

    with tempfile.TemporaryDirectory() as out_dir, Progress(transient=True) as bar:
        p2 = _run(2, cfg, out_dir, bar)
        p4 = _run(4, cfg, out_dir, bar)
    s2, s4 = _summarize_p2(p2), _summarize_p4(p4, cfg)
    res = {"config": cfg, "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
           "p2": s2, "p4": s4, **{k: v for k, v in s2.items() if "ratio" in k},
           **{k: v for k, v in s4.items() if k.endswith("_p4")}}
    _print_tables(res)
    if args.json:
        print(json.dumps(res))
    return 0
