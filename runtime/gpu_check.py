"""``make gpu-check`` (``python -m trainmem.runtime.gpu_check``): every CUDA path of the project, on one GPU.

Each check runs the real code path and compares it with a reference, giving a pass/fail and one
figure; the last line printed is one JSON object. Paths: activation offload (copy streams and the
pinned host pool; gradients bitwise equal to keeping everything), parameter placement over the device,
host and disk tiers (the device budget checked with ``torch.cuda.max_memory_allocated``), snapshot
capture from CUDA tensors (pinned staging on a side stream, fetched back from the holder and
compared), the product-key memory layer forward and backward on CUDA vs CPU, NVML telemetry, and a
one-rank NCCL group. Without CUDA it says "no CUDA" and exits 0 (CI never depends on it). Budget: well
under 5 minutes on one GPU.

The offload, placement, snapshot and memory-layer checks take the device as an argument, so the
test suite runs them on CPU too (their API use and references are checked on every machine); the
CUDA-only measurements are taken where the device is CUDA.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch

from .models import ModelConfig, build, lm_loss

_MODEL = ModelConfig(size="small")  # 6 blocks, d_model 384, 256 tokens: ~11M parameters, seconds per step on a GPU


def _batch(cfg: ModelConfig, n: int, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
    return x.to(device), y.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _deterministic_attention() -> Iterator[None]:
    """The math SDPA kernel: flash/efficient attention backward may add in a different order run to run, and
    the offload check promises bitwise-equal gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _grads_and_peak(model, x, y, device: torch.device, policy=None) -> tuple[dict[str, torch.Tensor], int | None]:
    """One forward + backward (inside ``policy.step()`` when given): gradients and the CUDA peak above the start."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with _deterministic_attention():
        if policy is None:
            lm_loss(model(x), y).backward()
        else:
            with policy.step():
                lm_loss(model(x), y).backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, peak


def check_activation_offload(device: torch.device) -> dict[str, Any]:
    """Every block's saved tensors offloaded (alpha=1) to the host pool: gradients bitwise equal to keeping them;
    on CUDA the pool is pinned, copies run on side streams and the step's peak memory is below keeping's."""
    from trainmem.offload import ActivationConfig, ActivationPolicy

    x, y = _batch(_MODEL, 8, device)
    model = build(_MODEL, 0).to(device)
    keep, keep_peak = _grads_and_peak(model, x, y, device)
    again, _ = _grads_and_peak(model, x, y, device)
    reproducible = all(torch.equal(keep[n], again[n]) for n in keep)
    policy = ActivationPolicy(ActivationConfig(activations="offload", alpha=1.0), model.blocks)
    try:
        with _deterministic_attention():
            policy.plan(lambda: model(x))
        got, offload_peak = _grads_and_peak(model, x, y, device, policy)
        stats = dict(policy.last_stats)
        pinned = bool(policy.pool is not None and policy.pool.pinned and policy.pool.arena.is_pinned())
        streams = len(policy.engine._streams) if policy.engine is not None else 0
    finally:
        policy.remove()
    equal = all(torch.equal(got[n], keep[n]) for n in keep)
    moved = int(stats.get("moved_device_to_host_bytes", 0))
    ok = reproducible and equal and moved > 0 and stats.get("peak_host_saved_bytes", 0) > 0
    if device.type == "cuda":
        ok = ok and pinned and streams > 0 and offload_peak < keep_peak
    return {"pass": ok, "figure": moved, "unit": "bytes copied device->host pool in one step",
            "grads_bitwise_equal": equal, "keep_reproducible": reproducible, "pinned_pool": pinned,
            "cuda_stream_pairs": streams, "keep_peak_bytes": keep_peak, "offload_peak_bytes": offload_peak,
            "stats": stats}


_LR, _WD, _CLIP, _STEPS = 1e-3, 0.1, 1.0, 3


def _plain_adamw(x, y, device: torch.device) -> tuple[list[float], int | None, int | None]:
    """The unplaced model under torch AdamW: losses, the peak of one forward+backward (parameters, gradients,
    activations, workspace) and the peak of the whole run (optimizer state too), both CUDA bytes above the start."""
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model = build(_MODEL, 0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WD)
    losses, fwd_bwd_peak = [], None
    for step in range(_STEPS):
        loss = lm_loss(model(x), y)
        loss.backward()
        if step == 0 and base is not None:
            _sync(device)
            fwd_bwd_peak = torch.cuda.max_memory_allocated(device) - base
        torch.nn.utils.clip_grad_norm_(model.parameters(), _CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(device)
    run_peak = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    return losses, fwd_bwd_peak, run_peak


def check_placement(device: torch.device) -> dict[str, Any]:
    """ChunkedEngine over all three tiers (a device budget of half the parameters' bytes, a host budget of two
    states' bytes so the rest lives in a disk slot file): the losses of torch AdamW on the unplaced model
    (rel 1e-4: the host optimizer vs the device's), the arena within the budget, bytes through every tier, and on CUDA
    ``max_memory_allocated`` at most the budget plus what the unplaced forward+backward needs beyond its
    parameters (activations, gradients in flight, workspace), below the unplaced run's peak."""
    from trainmem.offload import ChunkedEngine, PlacementConfig

    x, y = _batch(_MODEL, 4, device)
    ref, fwd_bwd_peak, plain_peak = _plain_adamw(x, y, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    param_bytes = build(_MODEL, 0).num_params() * 4
    budget = param_bytes // 2  # the arena cannot hold the model: chunks must move
    base = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with tempfile.TemporaryDirectory(prefix="trainmem-gpu-check-") as disk:
        cfg = PlacementConfig(device_bytes=budget, host_bytes=2 * param_bytes, disk_path=disk, disk_bytes="1GiB",
                              optimizer="torch")
        engine = ChunkedEngine(build(_MODEL, 0), cfg, lr=_LR, weight_decay=_WD, loss_fn=lm_loss, device=device)
        ours, arena_peak, disk_moved = [], 0, 0
        try:
            for _ in range(_STEPS):
                ours.append(engine.forward_backward(x, y))
                engine.clip(_CLIP)
                engine.optimizer_step()
                arena_peak = max(arena_peak, engine.last_stats["arena_peak_bytes"])
                disk_moved += engine.last_stats.get("moved_host_to_disk_bytes", 0)
            _sync(device)
            moved = engine.last_stats.get("moved_host_to_device_bytes", 0)
            chunks_move = engine.arena.n_slots < engine.layout.n_chunks
            homes = sorted(set(engine.plan.homes.values()))
        finally:
            engine.remove()
    peak = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    close = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(ours, ref))
    ok = close and arena_peak <= budget and chunks_move and moved > 0 and "disk" in homes and disk_moved > 0
    allowance = None
    if peak is not None:
        allowance = fwd_bwd_peak - param_bytes
        ok = ok and peak <= budget + allowance and peak < plain_peak
    return {"pass": ok, "figure": peak if peak is not None else arena_peak,
            "unit": "max_memory_allocated bytes (placement run)" if peak is not None else "arena peak bytes",
            "budget_bytes": budget, "non_parameter_allowance_bytes": allowance, "plain_peak_bytes": plain_peak,
            "arena_peak_bytes": arena_peak, "moved_host_to_device_bytes": moved,
            "moved_host_to_disk_bytes": disk_moved, "state_homes": homes,
            "losses": ours, "plain_losses": ref}


def check_snapshot_capture(device: torch.device) -> dict[str, Any]:
    """SnapshotWriter stages device tensors (on CUDA: a side stream into pinned slots) while the loop goes on;
    the holder's copy, fetched back, is bitwise the state at capture."""
    import ray

    from trainmem.checkpoint import SnapshotCoordinator, SnapshotWriter, fetch_snapshot, start_holders, unpack

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 object_store_memory=200 << 20)
    try:
        holders = start_holders([ray.get_runtime_context().get_node_id()], f"gpucheck-{time.time_ns()}", keep=1)
        coord = SnapshotCoordinator(holders, world=1, k=1, m=0, keep=1)
        writer = SnapshotWriter(rank=0, holders=holders, home=0, k=1, m=0, put_timeout_s=60,
                                on_prepared=coord.on_prepared, strict=True)
        try:
            g = torch.Generator(device=device).manual_seed(3)
            state = {"model.w": torch.randn(2048, 1024, device=device, generator=g),
                     "optim.0.exp_avg": torch.randn(2048, 1024, device=device, generator=g)}
            expected = {n: t.to("cpu", copy=True) for n, t in state.items()}
            blocked = writer.capture(1, state, {"step": 1})
            state["model.w"][:256] @ state["optim.0.exp_avg"][:256].T  # the loop's forward runs beside the copy
            waited = writer.wait()  # the contract: nothing changes the state before this returns
            for t in state.values():
                t.add_(1.0)  # the next optimizer step
            staging_pinned = writer.staging_pinned
            prepared = writer.flush()
            snap = fetch_snapshot(holders, 1, 0, home=0)
            out = unpack(snap.buffer, snap.layout)
        finally:
            writer.close()
            holders.close()
    finally:
        if started:
            ray.shutdown()
    equal = prepared == 1 and all(torch.equal(out[n], t) for n, t in expected.items())
    ok = equal and (staging_pinned is True or device.type != "cuda")
    return {"pass": ok, "figure": blocked + waited, "unit": "s the loop was blocked (capture + wait)",
            "bitwise_equal": equal, "pinned_staging": staging_pinned, "fetch_s": snap.seconds}


def check_memory_layer(device: torch.device) -> dict[str, Any]:
    """ProductKeyMemory forward and backward on ``device`` vs CPU, in float64 so that fp32 rounding cannot
    flip a top-k choice between devices (scores are compared, slots must be identical)."""
    from trainmem.memory_services import ProductKeyConfig, ProductKeyMemory

    cfg = ProductKeyConfig(d_model=256, heads=4, n_keys=64, k_dim=64, topk=8)
    torch.manual_seed(0)
    cpu = ProductKeyMemory(cfg).double()
    dev = ProductKeyMemory(cfg).double()
    dev.load_state_dict(cpu.state_dict())
    dev.to(device)
    x = torch.randn(8, 32, 256, dtype=torch.float64)
    with torch.no_grad():
        same_slots = torch.equal(cpu.lookup(x.view(-1, 256))[1], dev.lookup(x.view(-1, 256).to(device))[1].cpu())
    out_cpu, out_dev = cpu(x), dev(x.to(device))
    out_cpu.square().sum().backward()
    out_dev.square().sum().backward()
    err = (out_dev.cpu() - out_cpu).abs().max().item() / (out_cpu.abs().max().item() + 1e-30)
    grad_err = 0.0
    for (name, p), q in zip(cpu.named_parameters(), dev.parameters()):
        a = p.grad.to_dense() if p.grad.is_sparse else p.grad
        b = (q.grad.to_dense() if q.grad.is_sparse else q.grad).cpu()
        grad_err = max(grad_err, (b - a).abs().max().item() / (a.abs().max().item() + 1e-30))
    # softmax runs in float32 by design: its rounding bounds the agreement
    return {"pass": same_slots and err < 1e-5 and grad_err < 1e-4, "figure": err,
            "unit": "max |out_device - out_cpu| / max |out_cpu|", "same_slots": same_slots, "grad_rel_err": grad_err}


def check_nvml() -> dict[str, Any]:
    """GpuTelemetry reads every visible GPU; GPU 0's used memory covers what this process has reserved."""
    from .telemetry import GpuTelemetry

    hold = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    events: list[str] = []
    telemetry = GpuTelemetry(lambda name, **fields: events.append(name), announce=True)
    try:
        sample = telemetry.sample()
    finally:
        telemetry.close()
    gpus = sample.get("gpus", [])
    reserved = torch.cuda.memory_reserved()
    del hold
    ok = (bool(gpus) and "nvml_unavailable" not in events
          and all(g["mem_total_bytes"] > 0 and 0 <= g["util_pct"] <= 100 and g["power_w"] > 0 for g in gpus)
          and gpus[0]["mem_used_bytes"] >= reserved)
    return {"pass": ok, "figure": gpus[0]["mem_used_bytes"] if gpus else None, "unit": "GPU 0 used bytes (NVML)",
            "torch_reserved_bytes": reserved, "sample": sample, "events": events}


def check_nccl() -> dict[str, Any]:
    """A one-rank NCCL group: all_reduce and broadcast of 64 MiB on the device."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60),
                            device_id=torch.device("cuda", 0))
    try:
        t = torch.full((16 << 20,), 2.0, device="cuda")
        dist.all_reduce(t)  # first call sets the communicator up: not timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        ok = bool(torch.all(t == 2.0)) and dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()
    return {"pass": ok, "figure": seconds, "unit": "s for a 64 MiB all_reduce + broadcast (world 1)"}


def _on_cuda(check: Callable[[torch.device], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return lambda: check(torch.device("cuda", 0))


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "activation_offload": _on_cuda(check_activation_offload), "placement": _on_cuda(check_placement),
    "snapshot_capture": _on_cuda(check_snapshot_capture), "memory_layer": _on_cuda(check_memory_layer),
    "nvml": check_nvml, "nccl": check_nccl,
}


def run_checks(checks: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Run each check; one that raises is a failure with its error, and the others still run."""
    results: dict[str, Any] = {}
    for name, check in checks.items():
        t0 = time.perf_counter()
        try:
            results[name] = check()
        except Exception as e:
            results[name] = {"pass": False, "figure": None, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(limit=8)}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        r = results[name]
        print(f"gpu-check {name}: {'pass' if r['pass'] else 'FAIL'} ({r.get('figure')} {r.get('unit', '')}, "
              f"{r['seconds']} s){'  ' + r['error'] if 'error' in r else ''}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA (torch.cuda.is_available() is False): nothing to check on this machine")
        print(json.dumps({"cuda": False, "passed": None, "checks": {}}))
        return 0
    t0 = time.perf_counter()
    results = run_checks(CHECKS)
    passed = all(r["pass"] for r in results.values())
    print(json.dumps({"cuda": True, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                      "passed": passed, "wall_s": round(time.perf_counter() - t0, 2), "checks": results},
                     default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
