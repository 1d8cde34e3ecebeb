"""``trainmem export RUN_DIR OUT.safetensors``: the newest intact durable checkpoint as a plain state dict.

Reads ``<checkpoint dir>/rank-<r>/`` stores (ranks that save their own shard: [placement] chunk shards,
pipeline stages) or the single store of a data-parallel run, through :class:`DurableStore`. A step whose
files fail their checksums on any rank is named and skipped for the next older one every rank has.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .usage import Parser, UsageError, fail

USAGE = "trainmem export RUN_DIR OUT.safetensors"


def _checkpoint_root(run_dir: Path) -> Path:
    spec = run_dir / "spec.json"
    if spec.exists():
        try:
            configured = json.loads(spec.read_text()).get("checkpoint", {}).get("dir")
        except (OSError, ValueError, AttributeError):
            configured = None
        if configured:
            return Path(configured)
    return run_dir / "checkpoints"


def _stores(root: Path):
    from trainmem.checkpoint import DurableStore

    ranks = sorted(int(p.name.split("-", 1)[1]) for p in root.glob("rank-*") if p.name.split("-", 1)[1].isdigit())
    if ranks:
        if ranks != list(range(len(ranks))):
            raise ValueError(f"{root}: rank stores {ranks} are not 0..{len(ranks) - 1}")
        return [DurableStore(root / f"rank-{r}") for r in ranks]
    return [DurableStore(root)]


def _state_dict(stores, step: int) -> dict:
    """One step's plain state dict; raises CheckpointCorrupt (or ValueError) when it cannot be built."""
    from trainmem.offload import CHECKPOINT_FORMAT, state_dict_from_shards

    loaded: dict[int, object] = {}

    def read(r: int):
        if r not in loaded:
            got = stores[r].load(step)
            if got is None:
                raise ValueError(f"rank {r} has no step {step}")
            loaded[r] = got
        return loaded[r].tensors, loaded[r].meta

    tensors, meta = read(0)
    if meta.get("format") == CHECKPOINT_FORMAT:
        return state_dict_from_shards(read, len(stores))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if len(stores) > 1:  # pipeline ranks each hold their stages' parameters
        for r in range(1, len(stores)):
            model.update({k[len("model."):]: v for k, v in read(r)[0].items() if k.startswith("model.")})
    if not model:
        raise ValueError(f"step {step} holds no model tensors")
    return model


def export(run_dir: Path, out: Path, log=print) -> tuple[int, int]:
    """Write the newest intact step's state dict to ``out`` atomically; returns (step, tensors)."""
    from safetensors.torch import save_file

    from trainmem.checkpoint import CheckpointCorrupt

    root = _checkpoint_root(run_dir)
    stores = _stores(root)
    steps = sorted(set.intersection(*(set(s.steps()) for s in stores)), reverse=True)
    if not steps:
        raise ValueError(f"{root}: no durable checkpoint that every rank has")
    for step in steps:
        try:
            state = _state_dict(stores, step)
        except (CheckpointCorrupt, ValueError, KeyError) as e:
            log(f"trainmem export: skipping step {step}: {e}")
            continue
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"step": str(step)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        return step, len(state)
    raise ValueError(f"{root}: every checkpoint ({', '.join(map(str, steps))}) failed its checks")


def main(argv: list[str]) -> int:
    parser = Parser(prog="trainmem export", usage=USAGE)
    parser.add_argument("run_dir", help="the run's directory (holds checkpoints/)")
    parser.add_argument("out", help="the .safetensors file to write")
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    run_dir, out = Path(args.run_dir), Path(args.out)
    if not run_dir.is_dir():
        return fail(f"trainmem export: {run_dir} is not a directory (fix: pass a run directory)")
    if not out.parent.is_dir():
        return fail(f"trainmem export: {out.parent} does not exist (fix: create it or pick another path)")
    try:
        step, n = export(run_dir, out, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:
        return fail(f"trainmem export: {e}")
    print(f"wrote {out}: {n} tensors from step {step}")
    return 0
