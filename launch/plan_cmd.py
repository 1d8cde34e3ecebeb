"""``trainmem plan JOB.toml``: with [placement], the parameter placement (chunk size and waste, bytes per tier
per state type, bytes moved per step per tier pair), computed from the model's shapes; otherwise measure one
warm-up step of the job's model on a real batch and print the activation plan ([memory] section) as a table
with the predicted peak and overhead."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

USAGE = "trainmem plan JOB.toml [--json] [--batch-size N] [--seq-len N] [--device cpu|cuda]"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainmem plan", usage=USAGE, add_help=True, exit_on_error=False)
    p.add_argument("job", help="the job's TOML file")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (last line)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: model.seq_len)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the warm-up step")
    return p


def _fail(message: str) -> int:
    print(f"trainmem plan: {message}", file=sys.stderr)
    return 2


def _load(path: str):
    """(JobSpec, ActivationConfig). Works whether or not JobSpec already nests [memory]."""
    from trainmem.offload import ActivationConfig
    from trainmem.runtime.config import JobSpec, load_spec
    from trainmem.runtime.spec_loader import ConfigError, build_dataclass, read_toml

    if any(f.name == "memory" for f in dataclasses.fields(JobSpec)):
        spec = load_spec(path)
        return spec, spec.memory
    table = read_toml(path)
    memory = table.pop("memory", {})
    if not isinstance(memory, dict):
        raise ConfigError(path, "memory", f"must be a table, got {memory!r}", "write a [memory] section")
    cfg = build_dataclass(ActivationConfig, memory, path, "memory")
    spec = build_dataclass(JobSpec, table, path, "")
    base = Path(path).parent
    spec.data.paths = [str(p if Path(p).expanduser().is_absolute() or Path(p).exists() else base / p)
                       for p in spec.data.paths]
    return spec, cfg


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        if isinstance(e, SystemExit):
            return int(e.code or 0)
        return _fail(f"{e} (usage: {USAGE})")
    from trainmem.offload import ActivationPolicy, PlanInfeasible, plan_table
    from trainmem.runtime.data import open_corpus
    from trainmem.runtime.models import build, lm_loss
    from trainmem.runtime.spec_loader import ConfigError

    try:
        spec, cfg = _load(args.job)
    except ConfigError as e:
        return _fail(str(e))
    if spec.placement.enabled:
        return _placement(spec, args)
    if args.batch_size is not None and args.batch_size <= 0:
        return _fail(f"--batch-size={args.batch_size} must be > 0")
    if args.seq_len is not None and args.seq_len <= 0:
        return _fail(f"--seq-len={args.seq_len} must be > 0")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return _fail("--device cuda: no CUDA device on this machine (fix: --device cpu)")
    model_cfg = spec.model.with_(seq_len=args.seq_len) if args.seq_len else spec.model
    batch = args.batch_size or spec.train.batch_size
    console = Console(stderr=True)
    try:
        with console.status(f"warm-up step: {model_cfg.size} GPT, batch {batch} x {model_cfg.seq_len} tokens"):
            model = build(model_cfg, spec.train.seed).to(args.device).train()
            x, y = open_corpus(spec.data).batch(seed=spec.train.seed, step=0, rank=0, world=1, batch_size=batch,
                                                seq_len=model_cfg.seq_len)
            x, y = x.to(args.device), y.to(args.device)
            policy = ActivationPolicy(cfg, model.blocks)
            plan = policy.plan(lambda: lm_loss(model(x), y).backward())
            policy.remove()
    except PlanInfeasible as e:
        return _fail(f"{args.job}: memory.activation_budget: {e}")
    except (ValueError, OSError) as e:
        return _fail(f"{args.job}: {e}")
    return _show(plan, plan_table, args)


def _show(plan, table, args) -> int:
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        Console(width=max(100, Console().width)).print(table(plan))
    return 0


def _placement(spec, args) -> int:
    from trainmem.offload import PlacementInfeasible, placement_table
    from trainmem.runtime.config import placement_plan

    try:
        plan = placement_plan(spec)
    except PlacementInfeasible as e:
        return _fail(f"{args.job}: {e}")
    return _show(plan, placement_table, args)
