"""The durable tier's save and restore throughput: local disk vs S3 (SeaweedFS on 127.0.0.1), same run.

The state is a GPT's parameters plus two Adam moments (what a durable checkpoint of that model
holds). Each side saves and loads it ``repeats`` times through :class:`DurableStore` (safetensors,
sha256, manifest, LATEST; local: fsync + rename); the best time counts. Beside ours, a bare
pyarrow PUT/GET of the same bytes to the same bucket is the ceiling the S3 side could reach.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from rich.table import Table
from safetensors.torch import save

from .durable import DurableStore
from .seaweed import LocalS3, S3ServerError
from .storage import Location


def _state(size: str) -> dict[str, torch.Tensor]:
    from trainmem.runtime.models import GPT, ModelConfig

    model = GPT(ModelConfig(size=size))
    params = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
    return {**params, **{f"opt.exp_avg.{k}": torch.randn_like(v.float()) for k, v in params.items()},
            **{f"opt.exp_avg_sq.{k}": torch.rand_like(v.float()) for k, v in params.items()}}


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _save_load(store: DurableStore, state: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    steps = iter(range(1, 1000))
    save_s = _best(lambda: store.save(next(steps), state, {"world": 1}), repeats)
    load_s = _best(lambda: store.load(), repeats)
    return save_s, load_s


def durable_throughput(size: str = "small", repeats: int = 3) -> dict[str, Any]:
    """{local,s3}_{save,restore}_gbps (GB/s of safetensors bytes), the raw S3 ceiling and the ratios."""
    state = _state(size)
    nbytes = len(save(state))
    out: dict[str, Any] = {"durable_bytes": nbytes}
    with tempfile.TemporaryDirectory(prefix="trainmem-bench-durable-") as tmp:
        save_s, load_s = _save_load(DurableStore(tmp, keep=2), state, repeats)
    out["local_save_gbps"], out["local_restore_gbps"] = nbytes / save_s / 1e9, nbytes / load_s / 1e9
    try:
        with LocalS3(bucket="bench") as s3:
            location = Location(s3.uri("durable"), s3.storage)
            save_s, load_s = _save_load(DurableStore(location, keep=2), state, repeats)
            blob = save(state)
            put_s = _best(lambda: location.write_bytes("raw", blob), repeats)
            get_s = _best(lambda: location.read_bytes("raw"), repeats)
            out["s3_server_start_s"] = s3.start_s
    except (S3ServerError, OSError) as e:  # a miss is reported, not hidden
        out["s3_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    out["s3_save_gbps"], out["s3_restore_gbps"] = nbytes / save_s / 1e9, nbytes / load_s / 1e9
    out["s3_raw_put_gbps"], out["s3_raw_get_gbps"] = nbytes / put_s / 1e9, nbytes / get_s / 1e9
    out["ratio_s3_local_save"] = out["s3_save_gbps"] / out["local_save_gbps"]
    out["ratio_s3_local_restore"] = out["s3_restore_gbps"] / out["local_restore_gbps"]
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def throughput_table(figures: dict[str, Any]) -> Table:
    table = Table(title=f"durable tier, {figures['durable_bytes'] / 1e6:.0f} MB state (params + Adam moments): "
                        "local disk vs S3 (SeaweedFS, loopback)")
    for col in ("GB/s", "local disk", "S3", "S3 raw pyarrow", "S3 / local"):
        table.add_column(col, justify="right")
    for op, raw in (("save", "put"), ("restore", "get")):
        s3 = figures.get(f"s3_{op}_gbps")
        table.add_row(op, f"{figures[f'local_{op}_gbps']:.3f}", f"{s3:.3f}" if s3 is not None else "miss",
                      f"{figures[f's3_raw_{raw}_gbps']:.3f}" if s3 is not None else "-",
                      f"{figures[f'ratio_s3_local_{op}']:.2f}" if s3 is not None else "-")
    return table
