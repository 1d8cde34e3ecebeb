"""``trainmem bench placement [--json] [--quick]``: our chunked placement beside DeepSpeed ZeRO-3 offload.

In one run, each side in a fresh child process with 2 gloo ranks and the same GPT, data, seed and
thread count: ours (host tier) vs DeepSpeed ZeRO-3 with offload_param + offload_optimizer = cpu
(DeepSpeedCPUAdam); ours with the disk tier vs ZeRO-Infinity NVMe offload (libaio; bf16, which that
path needs on the CPU accelerator); FSDP2 + CPUOffloadPolicy(pin_memory=False) as a compute baseline.
Figures: median step time (wall clock) at equal model size; peak host RSS per parameter (each rank's
peak minus its RSS before the model was built); device working-set peak under the same budget (ours:
the arena; DeepSpeed: bytes of gathered parameters, read in operator pre-hooks); bytes moved per step
per tier pair against the trace's minimum; the largest model whose ranks' RSS stays under a cap
with the disk tier (a bounded ladder of sizes, one child per try, stopping at the first that fails,
exceeds the cap or its time limit); loss parity over the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..activations.render import format_bytes
from .config import parse_bytes

LADDER = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096)  # d_model of the size search (4 layers)


def _parse(argv):
    p = argparse.ArgumentParser(prog="trainmem bench placement")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--size", default="small", help="GPT preset for the equal-size comparison")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--steps", type=int, default=10, help="steps per side (loss parity over these)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank, every side")
    p.add_argument("--device-bytes", default="24MiB", help="device budget for ours and DeepSpeed")
    p.add_argument("--disk-path", default="", help="directory for the disk/NVMe tier (default: a temp dir)")
    p.add_argument("--rss-cap", default="8GiB", help="the size search's cap on the ranks' summed peak RSS")
    p.add_argument("--search-timeout-s", type=float, default=240.0, help="time limit per size tried")
    p.add_argument("--no-search", action="store_true", help="skip the largest-model search")
    p.add_argument("--no-nvme", action="store_true", help="skip the disk tier and ZeRO-Infinity")
    p.add_argument("--sides", default="", help="comma-separated subset of the sides to run (default: all; "
                                              "ours and deepspeed are always run: the ratios need them)")
    return p.parse_args(argv)


def _run_side(cfg: dict, workdir: Path, timeout_s: float) -> dict:
    name = f"{cfg['side']}-{cfg['model'].get('d_model', cfg['model']['size'])}-{time.monotonic_ns()}"
    cfg_path, out_path, log_path = (workdir / f"{name}.{e}" for e in ("json", "out.json", "log"))
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "DS_ACCELERATOR": "cpu"}
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run([sys.executable, "-m", "trainmem.offload.params.bench_side", str(cfg_path),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return {"side": cfg["side"], "error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    if rc != 0 or not out_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        return {"side": cfg["side"], "error": f"exit {rc}: {tail[0][:300]}", "wall_s": time.perf_counter() - t0}
    return json.loads(out_path.read_text())


def _smallest(model: dict, world: int, key: str, disk_path: str, device: int | None = None) -> int:
    """The smallest device (or host) budget our planner accepts for this model: what the search gives ours."""
    from trainmem.runtime.models import GPT, ModelConfig

    from .config import PlacementConfig
    from .planner import PlacementInfeasible, plan_for_module

    kw = {"device_bytes": 4096} if key == "device" else {
        "device_bytes": device or _smallest(model, world, "device", disk_path), "host_bytes": 4096, "disk_path": disk_path,
        "disk_bytes": "16GiB"}
    with torch.device("meta"):
        gpt = GPT(ModelConfig(**model))
    try:
        plan_for_module(gpt, PlacementConfig(**kw), world=world)
    except PlacementInfeasible as e:
        return e.smallest
    return kw[f"{key}_bytes"]


def _search(side: str, base: dict, cap: int, timeout_s: float, workdir: Path, progress, task) -> dict:
    tried = []
    best = None
    for d in LADDER:
        model = {"size": "small", "n_layer": 4, "n_head": 8, "d_model": d, "seq_len": 32}
        cfg = {**base, "side": side, "model": model, "steps": 2, "batch": 1}
        if side == "ours":
            cfg["device_bytes"] = _smallest(model, base["world"], "device", base["disk_path"])
            cfg["host_bytes"] = _smallest(model, base["world"], "host", base["disk_path"], cfg["device_bytes"])
            cfg["disk_bytes"] = "16GiB"
        else:
            cfg["device_bytes"] = _smallest(model, base["world"], "device", base["disk_path"])
        r = _run_side(cfg, workdir, timeout_s)
        rss = sum(r.get("peak_rss_bytes", [0]))
        ok = "error" not in r and rss <= cap
        tried.append({"d_model": d, "params": r.get("params"), "peak_rss_bytes": rss, "ok": ok,
                      "error": r.get("error"), "wall_s": r.get("wall_s")})
        progress.advance(task)
        if not ok:
            break
        best = r["params"]
    return {"max_params": best, "tried": tried}


def _per_param(r: dict) -> float:
    return max(p - b for p, b in zip(r["peak_rss_bytes"], r["base_rss_bytes"])) * len(r["peak_rss_bytes"]) / r["params"]


def _ratio(a, b):
    return a / b if a is not None and b else None


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.quick:
        args.size, args.seq_len, args.steps, args.device_bytes, args.no_search = "tiny", 64, 4, "600KB", True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .optim import extensions_dir

    extensions_dir()  # children inherit it: DeepSpeed's ops are built once and cached
    device = parse_bytes(args.device_bytes, "--device-bytes")
    workdir = Path(tempfile.mkdtemp(prefix="trainmem-bench-placement-"))
    disk_path = args.disk_path or str(workdir / "disk")
    Path(disk_path).mkdir(parents=True, exist_ok=True)
    base = {"world": 2, "threads": args.threads, "seed": 0, "steps": args.steps, "batch": args.batch, "lr": 1e-3,
            "wd": 0.1, "clip": 1.0, "model": {"size": args.size, "seq_len": args.seq_len}, "device_bytes": device,
            "disk_path": disk_path}
    sides = {"ours": {}, "ours_fused": {"side": "ours", "optimizer": "torch_fused"}, "deepspeed": {}, "fsdp2": {}}
    if not args.no_nvme:
        host = _smallest(base["model"], 2, "host", disk_path, device)
        sides["ours_disk"] = {"side": "ours", "host_bytes": host, "disk_bytes": "16GiB"}
        sides["deepspeed_nvme"] = {}
    if args.sides:
        wanted = {x.strip() for x in args.sides.split(",") if x.strip()} | {"ours", "deepspeed"}
        unknown = wanted - set(sides)
        if unknown:
            print(f"trainmem bench placement: --sides: unknown side(s) {sorted(unknown)} "
                  f"(fix: pick from {sorted(sides)})", file=sys.stderr)
            return 2
        sides = {k: v for k, v in sides.items() if k in wanted}
    cap = parse_bytes(args.rss_cap, "--rss-cap")
    results: dict[str, dict] = {}
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("placement bench", total=len(sides) + (0 if args.no_search else 2 * len(LADDER)))
        for name, extra in sides.items():
            progress.update(task, description=name)
            results[name] = _run_side({**base, "side": name, **extra}, workdir, 900)
            progress.advance(task)
        search = {}
        if not args.no_search:
            for side in ("ours", "deepspeed_nvme"):
                progress.update(task, description=f"size search: {side}")
                search[side] = _search(side, base, cap, args.search_timeout_s, workdir, progress, task)
    if not args.disk_path:
        shutil.rmtree(disk_path, ignore_errors=True)  # swap files of both sides; the logs stay in workdir
    out = _summary(results, search, args, device, cap)
    out.update({"machine": platform.node(), "torch": torch.__version__, "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(), "workdir": str(workdir)})
    Console(width=160).print(_table(results, device))
    print(f"step ours/DeepSpeed {out['step_ratio_vs_deepspeed']} (target <= 0.8); host bytes/param "
          f"{out['host_bytes_per_param_ratio_vs_deepspeed']} (<= 0.6); largest model {out['max_params_ratio_vs_deepspeed']}"
          f" (>= 2); bytes moved vs min {out['bytes_moved_vs_min']} (<= 1.2); loss max rel diff {out['loss_max_rel_diff']}")
    if args.json:
        print(json.dumps(out))
    return 0


def _summary(results, search, args, device, cap) -> dict:
    ours, ds = results["ours"], results["deepspeed"]
    ok = lambda r: "error" not in r  # noqa: E731
    out: dict = {"sides": results, "search": search, "device_budget_bytes": device, "rss_cap_bytes": cap}
    if ok(ours) and ok(ds):
        out["step_ratio_vs_deepspeed"] = _ratio(ours["step_s_median"], ds["step_s_median"])
        out["host_bytes_per_param_ratio_vs_deepspeed"] = _ratio(_per_param(ours), _per_param(ds))
        out["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], ds["losses"]))
        out["device_peak_ours_bytes"] = ours["arena_peak_bytes"]
        out["device_peak_deepspeed_bytes"] = ds["gathered_peak_bytes"]
        moved = ours["moved"].get("moved_host_to_device_bytes", 0)
        out["bytes_moved_vs_min"] = _ratio(moved, ours["host_to_device_min_bytes"])
        out["bytes_moved_vs_floor"] = _ratio(moved, ours["host_to_device_floor_bytes"])
    else:
        for key in ("step_ratio_vs_deepspeed", "host_bytes_per_param_ratio_vs_deepspeed", "loss_max_rel_diff",
                    "bytes_moved_vs_min"):
            out[key] = None
    if ok(results.get("fsdp2", {"error": 1})) and ok(ours):
        out["step_ratio_vs_fsdp2"] = _ratio(ours["step_s_median"], results["fsdp2"]["step_s_median"])
        out["loss_max_rel_diff_vs_fsdp2"] = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"],
                                                                                   results["fsdp2"]["losses"]))
    if ok(results.get("ours_fused", {"error": 1})) and ok(ours):
        out["step_ratio_kernel_deepspeed_vs_fused"] = _ratio(ours["step_s_median"],
                                                             results["ours_fused"]["step_s_median"])
    if "ours_disk" in results and "deepspeed_nvme" in results and ok(results["ours_disk"]) and ok(results["deepspeed_nvme"]):
        out["step_ratio_disk_vs_deepspeed_nvme"] = _ratio(results["ours_disk"]["step_s_median"],
                                                          results["deepspeed_nvme"]["step_s_median"])
        out["host_bytes_per_param_ratio_disk_vs_deepspeed_nvme"] = _ratio(_per_param(results["ours_disk"]),
                                                                          _per_param(results["deepspeed_nvme"]))
    out["max_params_ratio_vs_deepspeed"] = (_ratio(search["ours"]["max_params"], search["deepspeed_nvme"]["max_params"])
                                            if search else None)
    return out


def _table(results: dict, device: int) -> Table:
    table = Table(title=f"placement: 2 ranks, device budget {format_bytes(device)}")
    for col in ("side", "params", "step s (median)", "host RSS/param", "device peak", "moved h->d/step",
                "disk r+w/step", "final loss", "note"):
        table.add_column(col, justify="left" if col in ("side", "note") else "right")
    for name, r in results.items():
        if "error" in r:
            table.add_row(name, "-", "-", "-", "-", "-", "-", "-", r["error"][:60])
            continue
        moved = r.get("moved", {})
        disk = moved.get("moved_disk_to_host_bytes", 0) + moved.get("moved_host_to_disk_bytes", 0)
        peak = r.get("arena_peak_bytes", r.get("gathered_peak_bytes"))
        table.add_row(name, f"{r['params'] / 1e6:.1f}M", f"{r['step_s_median']:.3f}", f"{_per_param(r):.1f} B",
                      format_bytes(peak) if peak is not None else "-",
                      format_bytes(moved["moved_host_to_device_bytes"]) if moved else "-",
                      format_bytes(disk) if moved else "-", f"{r['losses'][-1]:.6f}",
                      r.get("optimizer_kernel", ""))
    return table
