"""One side of ``trainmem bench placement``, in a fresh process: 2 gloo ranks (a FileStore rendezvous, no port)
train the same GPT on the same data with one engine, and rank 0 writes the figures as JSON.

``python -m trainmem.offload.params.bench_side CONFIG.json OUT.json``. Sides: ``ours`` (ChunkedEngine),
``deepspeed`` (ZeRO-3, offload_param + offload_optimizer = cpu, DeepSpeedCPUAdam), ``deepspeed_nvme``
(ZeRO-Infinity: both offloaded to NVMe through libaio, bf16), ``fsdp2`` (CPUOffloadPolicy(pin_memory=False)).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BETAS, EPS = (0.9, 0.999), 1e-8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _data(cfg: dict, model_cfg, rank: int, world: int):
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    out = []
    for _ in range(cfg["steps"]):
        x = torch.randint(0, model_cfg.vocab_size, (cfg["batch"] * world, model_cfg.seq_len), generator=g)
        y = torch.randint(0, model_cfg.vocab_size, (cfg["batch"] * world, model_cfg.seq_len), generator=g)
        out.append((x.chunk(world)[rank], y.chunk(world)[rank]))
    return out


def _global_mean(loss: float, world: int) -> float:
    t = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _ours(cfg, model, data, rank, world):
    from trainmem.offload import ChunkedEngine, PlacementConfig
    from trainmem.offload.params.trace import simulate
    from trainmem.runtime.models import lm_loss

    pc = PlacementConfig(device_bytes=cfg["device_bytes"], host_bytes=cfg.get("host_bytes"),
                         disk_path=cfg["disk_path"] if cfg.get("disk_bytes") else "", disk_bytes=cfg.get("disk_bytes"),
                         optimizer=cfg.get("optimizer", "auto"))
    engine = ChunkedEngine(model, pc, lr=cfg["lr"], weight_decay=cfg["wd"], loss_fn=lm_loss,
                           device=torch.device("cpu"))
    losses, times, stats = [], [], []
    for x, y in data:
        t0 = time.perf_counter()
        losses.append(engine.forward_backward(x, y))
        engine.clip(cfg["clip"])
        engine.optimizer_step()
        times.append(time.perf_counter() - t0)
        stats.append(dict(engine.last_stats))
    trace = engine.trace
    capacity = engine.arena.n_slots - max(trace.max_grads_open(), 1) - (1 if world > 1 else 0)
    belady = simulate(trace.needs(), max(capacity, max(len(n) for n in trace.needs())), pin_previous=True).misses
    last = stats[-1]
    extra = {"arena_peak_bytes": max(s["arena_peak_bytes"] for s in stats[1:] or stats),
             "moved": {k: v for k, v in last.items() if k.startswith("moved_")},
             "host_to_device_min_bytes": belady * engine.layout.shard_bytes,
             "host_to_device_floor_bytes": engine.layout.n_chunks * engine.layout.shard_bytes,
             "chunk_bytes": engine.layout.chunk_bytes, "waste_fraction": engine.layout.waste_fraction,
             "homes": engine.plan.homes, "optimizer_kernel": engine.optimizer.kernel,
             "copy_stall_s": last.get("copy_stall_s", 0.0), "optimizer_s": last.get("optimizer_s")}
    engine.remove()
    return losses, times, extra


def _deepspeed(cfg, model, data, rank, world, nvme: bool):
    from trainmem.native import import_deepspeed
    from trainmem.runtime.models import lm_loss

    deepspeed = import_deepspeed()

    live = max(cfg["device_bytes"] // 4 // 2, 1)  # the same device budget, in parameter elements
    largest = max(p.numel() for p in model.parameters())
    if nvme:
        offload = {"device": "nvme", "nvme_path": cfg["disk_path"], "pin_memory": False,
                   "buffer_count": 20, "buffer_size": int(max(2e6, largest))}
        zero = {"offload_param": offload, "offload_optimizer": {"device": "nvme", "nvme_path": cfg["disk_path"],
                                                                "pin_memory": False}}
    else:
        zero = {"offload_param": {"device": "cpu", "pin_memory": False},
                "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg["batch"], "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg["clip"], "steps_per_print": 10 ** 9,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg["lr"], "weight_decay": cfg["wd"], "betas": list(BETAS),
                                                  "eps": EPS}},
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": live, "stage3_prefetch_bucket_size": live // 2,
                              "stage3_param_persistence_threshold": 0, **zero},
        "bf16": {"enabled": nvme},  # NVMe swap buffers are bf16 on the CPU accelerator (ANCHORS.md)
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gathered = {"now": 0, "peak": 0}
    params = list(engine.module.parameters())

    def measure(*_):  # bytes of parameters DeepSpeed holds gathered right now (after its own pre-hook)
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        now = sum(p.ds_numel * p.element_size() for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)
        gathered["peak"] = max(gathered["peak"], now)

    for m in engine.module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            m.register_forward_pre_hook(measure)
    losses, times = [], []
    for x, y in data:
        t0 = time.perf_counter()
        loss = lm_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item(), world))
    return losses, times, {"gathered_peak_bytes": gathered["peak"], "max_live_parameters": live}


def _fsdp2(cfg, model, data, rank, world):
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from trainmem.runtime.models import lm_loss

    policy = CPUOffloadPolicy(pin_memory=False)
    for block in model.blocks:
        fully_shard(block, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    losses, times = [], []
    for x, y in data:
        t0 = time.perf_counter()
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item(), world))
    return losses, times, {}


def _rank(rank: int, world: int, cfg: dict, root: str, out: str) -> None:
    torch.set_num_threads(cfg["threads"])
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.get("timeout_s", 600)))
    from trainmem.runtime.models import ModelConfig, build

    model_cfg = ModelConfig(**cfg["model"])
    base_rss = _rss_bytes()
    model = build(model_cfg, cfg["seed"])
    n_params = model.num_params()
    data = _data(cfg, model_cfg, rank, world)
    t0 = time.perf_counter()
    side = cfg["side"]
    if side == "ours":
        losses, times, extra = _ours(cfg, model, data, rank, world)
    elif side in ("deepspeed", "deepspeed_nvme"):
        losses, times, extra = _deepspeed(cfg, model, data, rank, world, nvme=side == "deepspeed_nvme")
    elif side == "fsdp2":
        losses, times, extra = _fsdp2(cfg, model, data, rank, world)
    else:
        raise ValueError(f"side={side!r}")
    peak = torch.tensor([_peak_rss_bytes(), base_rss], dtype=torch.int64)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        result = {"side": side, "params": n_params, "losses": losses, "step_s": times,
                  "step_s_median": statistics.median(times[1:] or times), "wall_s": time.perf_counter() - t0,
                  "peak_rss_bytes": [int(p[0]) for p in peaks], "base_rss_bytes": [int(p[1]) for p in peaks], **extra}
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    if side != "ours":
        # DeepSpeed's engine and FSDP2's device mesh keep their process groups referenced past
        # destroy_process_group, so the groups' gloo threads run on into interpreter shutdown, where
        # dropping a finished collective takes the GIL and aborts the process (SIGABRT) after the figures
        # are written. Those sides leave without that shutdown; ours frees its group (tests/test_native.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .optim import extensions_dir

    extensions_dir()
    with tempfile.TemporaryDirectory(prefix="trainmem-bench-") as root:
        mp.start_processes(_rank, args=(cfg["world"], cfg, root, argv[1]), nprocs=cfg["world"], join=True,
                           start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
