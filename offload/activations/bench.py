"""``trainmem bench activations [--json] [--quick]``: peak saved-activation bytes, step time and recomputed
FLOPs of the GPT under no policy, ``torch.utils.checkpoint`` per block, ``save_on_cpu``, and our policy at
50% and 25% of the no-policy peak, in one run.

Peak bytes are device-resident saved-tensor bytes, metered by unique storage through saved-tensor
hooks. Torch's checkpoint keeps its recomputed tensors out of reach of outer hooks, so its figure is
the metered inputs plus its largest block's re-materialized bytes (from the no-policy run), marked
``peak_estimated``. ``save_on_cpu`` is metered through its own pack hook: a packed tensor that still
shares the source's storage (what ``tensor.cpu()`` returns on a CPU-only machine) stays counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch.autograd.graph import save_on_cpu, saved_tensors_hooks
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from trainmem.runtime.models import ModelConfig, build, lm_loss

from .config import ActivationConfig
from .meter import SavedBytesMeter
from .policy import ActivationPolicy
from .render import format_bytes
from .stores import KeepStore

POLICIES = ("none", "checkpoint", "save_on_cpu", "ours@50%", "ours@25%")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainmem bench activations")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    p.add_argument("--configs", default="small:2048,small:4096,small:8192,base:2048",
                   help="comma-separated size:seq_len pairs")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per policy, interleaved; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Anchor:
    """An anchor policy applied per block, with our meter around each block (the same scope as ours)."""

    def __init__(self, name: str, model, meter: SavedBytesMeter):
        self.name, self.model, self.meter = name, model, meter
        self.keep = KeepStore(meter)
        for block in model.blocks:
            block.forward = self._wrap(block.forward)

    def _wrap(self, original):
        if self.name == "checkpoint":
            def forward(x):
                with saved_tensors_hooks(self.keep.pack, self.keep.unpack):  # sees the inputs it keeps
                    return checkpoint(original, x, use_reentrant=False, preserve_rng_state=True)
            return forward
        anchor = save_on_cpu(pin_memory=torch.cuda.is_available())
        pack, unpack = anchor.pack_hook, anchor.unpack_hook

        def metered_pack(t):
            packed = pack(t)
            same = packed[1].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            return packed, (self.keep.pack(t) if same else None)  # still device-resident: count it

        def forward(x):
            with saved_tensors_hooks(metered_pack, lambda p: unpack(p[0])):
                return original(x)
        return forward

    def remove(self) -> None:
        for block in self.model.blocks:
            block.__dict__.pop("forward", None)

    @contextmanager
    def step(self):
        self.meter.ignored = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self.meter.reset_peak()
        yield


class _Config:
    """One policy on its own copy of the model, ready to step."""

    def __init__(self, name: str, cfg: ModelConfig, x, y, device: str):
        self.name, self.x, self.y = name, x, y
        self.model = build(cfg, 0).to(device).train()
        self.policy, self.anchor, self.plan = None, None, None
        if name.startswith("ours") or name == "none":
            budget = {"ours@50%": 0.5, "ours@25%": 0.25}.get(name)
            act = ActivationConfig(activations="auto", activation_budget=budget) if budget else ActivationConfig()
            self.policy = ActivationPolicy(act, self.model.blocks)
            self.plan = self.policy.plan(lambda: self.model(x))
            self.ctx, self.meter = self.policy.step, self.policy.meter
        else:
            self.meter = SavedBytesMeter()
            self.anchor = _Anchor(name, self.model, self.meter)
            self.ctx = self.anchor.step

    def step(self) -> None:
        with self.ctx():
            lm_loss(self.model(self.x), self.y).backward()
        self.model.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.policy is not None:
            self.policy.remove()
        if self.anchor is not None:
            self.anchor.remove()


def _run_config(size: str, seq_len: int, args, progress, task) -> list[dict]:
    """All five policies on one (size, seq_len); timed steps interleaved (load hits every policy alike), the
    median wall clock reported, with CPU seconds beside it."""
    cfg = ModelConfig(size=size, seq_len=seq_len)
    device = args.device
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, seq_len), generator=g).to(device)
    runs, flops = {}, {}
    times, cpu, peaks = ({n: [] for n in POLICIES} for _ in range(3))
    for name in POLICIES:
        runs[name] = _Config(name, cfg, x, y, device)
        counter = FlopCounterMode(display=False)
        with counter:
            runs[name].step()  # also the untimed warm-up
        flops[name] = counter.get_total_flops()
        progress.advance(task)
    for k in range(args.steps):
        order = POLICIES[k % len(POLICIES):] + POLICIES[: k % len(POLICIES)]
        for name in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name].step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)  # all our threads' CPU time: robust to a shared machine
            peaks[name].append(runs[name].meter.peak)
            progress.advance(task)
    none = runs["none"]
    max_block = max(p.saved_bytes for p in none.policy.profiles)
    rows = []
    for name in POLICIES:
        run = runs[name]
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        row = {"size": size, "seq_len": seq_len, "batch_size": args.batch_size, "policy": name,
               "peak_bytes": max(peaks[name]), "step_s": med, "step_s_all": times[name],
               "step_cpu_s": med_cpu, "extra_step_cpu_s": med_cpu - statistics.median(cpu["none"]),
               "flops": flops[name], "peak_estimated": name == "checkpoint"}
        if name == "checkpoint":
            row["peak_bytes"] += max_block  # torch's recompute transient, invisible to outer hooks
        if run.plan is not None and run.plan.budget_bytes is not None:
            row["budget_bytes"] = run.plan.budget_bytes
            row["predicted_peak"] = run.plan.predicted_peak
            row["plan"] = [f"{r.decision}{'' if r.alpha is None else f'@{r.alpha:g}'}" for r in run.plan.rows]
        row["extra_step_s"] = row["step_s"] - statistics.median(times["none"])
        row["recomputed_flops"] = flops[name] - flops["none"]
        rows.append(row)
        run.close()
    return rows


def _summary(rows: list[dict]) -> dict:
    """Ratios of our 50%-budget plan's extra step time to full recompute's: wall clock (the headline), CPU
    seconds and recomputed FLOPs beside it; the worst configuration is reported."""
    cpu_ratios, wall_ratios, flop_ratios = [], [], []
    for key in sorted({(r["size"], r["seq_len"]) for r in rows}):
        by = {r["policy"]: r for r in rows if (r["size"], r["seq_len"]) == key}
        ck, ours = by["checkpoint"], by["ours@50%"]
        if ck["extra_step_cpu_s"] > 0:
            cpu_ratios.append(ours["extra_step_cpu_s"] / ck["extra_step_cpu_s"])
        if ck["extra_step_s"] > 0:
            wall_ratios.append(ours["extra_step_s"] / ck["extra_step_s"])
        if ck["recomputed_flops"] > 0:
            flop_ratios.append(ours["recomputed_flops"] / ck["recomputed_flops"])
    return {
        "extra_vs_recompute_50": max(wall_ratios) if wall_ratios else None,
        "extra_vs_recompute_50_each": wall_ratios,
        "extra_vs_recompute_50_basis": "wall clock: median of interleaved steps",
        "extra_vs_recompute_50_cpu": max(cpu_ratios) if cpu_ratios else None,
        "extra_vs_recompute_50_cpu_each": cpu_ratios,
        "recomputed_flops_vs_recompute_50": max(flop_ratios) if flop_ratios else None,
        "budget_respected": all(r["peak_bytes"] <= r["budget_bytes"] for r in rows if "budget_bytes" in r),
    }


def _table(rows: list[dict]) -> Table:
    table = Table(title="activations: peak saved bytes and step time (ratios vs no policy)")
    for col in ("model", "seq", "policy", "peak", "peak/none", "step s", "extra s", "step cpu s", "extra cpu s",
                "recomputed GFLOP", "plan"):
        table.add_column(col, justify="left" if col in ("model", "policy", "plan") else "right")
    none = {(r["size"], r["seq_len"]): r for r in rows if r["policy"] == "none"}
    for r in rows:
        base = none[(r["size"], r["seq_len"])]
        table.add_row(r["size"], str(r["seq_len"]), r["policy"],
                      format_bytes(r["peak_bytes"]) + ("*" if r["peak_estimated"] else ""),
                      f"{r['peak_bytes'] / base['peak_bytes']:.2f}", f"{r['step_s']:.2f}", f"{r['extra_step_s']:+.2f}",
                      f"{r['step_cpu_s']:.2f}", f"{r['extra_step_cpu_s']:+.2f}",
                      f"{r['recomputed_flops'] / 1e9:.1f}", " ".join(r.get("plan", [])))
    table.caption = "* torch checkpoint: metered inputs + its largest block's recompute transient"
    return table


def main(argv: list[str]) -> int:
    args = _parse(argv)
    configs = [("tiny", 128), ("small", 256)] if args.quick else []
    if not args.quick:
        try:
            configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",") if c]
            for size, seq_len in configs:
                ModelConfig(size=size, seq_len=seq_len)
        except (IndexError, ValueError):
            print(f"trainmem bench activations: --configs={args.configs!r} must be size:seq_len,... "
                  "(fix: e.g. small:2048,base:2048)", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    rows: list[dict] = []
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("activations bench", total=len(configs) * len(POLICIES) * (1 + args.steps))
        for size, seq_len in configs:
            progress.update(task, description=f"{size} @ {seq_len} tokens")
            rows.extend(_run_config(size, seq_len, args, progress, task))
    result = {"rows": rows, **_summary(rows), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "machine": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    Console(width=160).print(_table(rows))
    ratio = result["extra_vs_recompute_50"]
    cpu_ratio = result["extra_vs_recompute_50_cpu"]
    print(f"our extra step wall time at 50% budget / full recompute's: {ratio if ratio is None else f'{ratio:.2f}'} "
          f"(median of interleaved steps; target <= 0.5); CPU seconds ratio "
          f"{cpu_ratio if cpu_ratio is None else f'{cpu_ratio:.2f}'}; recomputed FLOPs ratio "
          f"{result['recomputed_flops_vs_recompute_50']}; budgets respected: {result['budget_respected']}")
    if args.json:
        print(json.dumps(result))
    return 0
