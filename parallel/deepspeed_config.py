"""The DeepSpeed config a trainmem job may give (``[engine] deepspeed_config``), checked key by key.

trainmem owns the optimization loop: the batch, optimizer, clipping and checkpoints come from the
job's ``[train]`` and ``[checkpoint]`` sections, so a DeepSpeed config that sets them is refused
with the section that does. What DeepSpeed keeps is ZeRO: the stage, its CPU offload and its
bucket/prefetch knobs. Everything else is refused by name rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

ZERO_KEYS = {
    "stage", "offload_optimizer", "offload_param", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
    "allgather_bucket_size", "allgather_partitions", "reduce_scatter", "round_robin_gradients", "sub_group_size",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
}
OFFLOAD_KEYS = {"device", "pin_memory"}
TOP_KEYS = {"zero_optimization", "steps_per_print", "wall_clock_breakdown", "fp16", "bf16"}
SET_BY_TRAINMEM = {
    "train_batch_size": "[train] batch_size (per rank) x [cluster] workers",
    "train_micro_batch_size_per_gpu": "[train] batch_size",
    "gradient_accumulation_steps": "[train] batch_size (one micro-batch per step)",
    "gradient_clipping": "[train] grad_clip",
    "optimizer": "[train] lr and weight_decay (AdamW, betas 0.9/0.999, eps 1e-8)",
    "scheduler": "[train] lr (constant; trainmem has no schedules yet)",
    "checkpoint": "[checkpoint] (trainmem's tiers save the ZeRO partitions)",
    "zero_optimization.elastic_checkpoint": "trainmem's reshard (restores onto any world size)",
}
BETAS, EPS = (0.9, 0.999), 1e-8


def check_deepspeed_config(table: dict[str, Any]) -> None:
    """Raise ValueError ``deepspeed_config.<key>=...: why (fix)`` for the first key trainmem cannot honour."""
    if not isinstance(table, dict):
        raise ValueError(f"deepspeed_config={table!r} must be a table (a JSON object)")
    for key, value in table.items():
        _check_top(key, value)
    zero = table.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"deepspeed_config.zero_optimization={zero!r} must be a table")
    for key, value in zero.items():
        where = f"deepspeed_config.zero_optimization.{key}"
        if f"zero_optimization.{key}" in SET_BY_TRAINMEM:
            raise ValueError(f"{where}={value!r} is set by trainmem from "
                             f"{SET_BY_TRAINMEM[f'zero_optimization.{key}']} (fix: remove it)")
        if key not in ZERO_KEYS:
            raise ValueError(f"{where}={value!r} is not supported by trainmem's DeepSpeed engine "
                             f"(fix: remove it; supported: {', '.join(sorted(ZERO_KEYS))})")
    stage = zero.get("stage")
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"deepspeed_config.zero_optimization.stage={stage!r} must be 1, 2 or 3 "
                         "(stage 0 is plain data parallelism: use [engine] kind = 'auto')")
    for part in ("offload_optimizer", "offload_param"):
        _check_offload(part, zero.get(part), stage)


def _check_top(key: str, value: Any) -> None:
    where = f"deepspeed_config.{key}"
    if key in SET_BY_TRAINMEM:
        raise ValueError(f"{where}={value!r} is set by trainmem from {SET_BY_TRAINMEM[key]} (fix: remove it)")
    if key not in TOP_KEYS:
        raise ValueError(f"{where}=... is not supported by trainmem's DeepSpeed engine "
                         f"(fix: remove it; supported: {', '.join(sorted(TOP_KEYS | {'zero_optimization'}))})")
    if key in ("fp16", "bf16"):
        enabled = value.get("enabled", False) if isinstance(value, dict) else value
        if enabled not in (False, "false"):
            raise ValueError(f"{where}.enabled={enabled!r}: trainmem's DeepSpeed engine trains in fp32 (its "
                             "snapshots hold the fp32 partitions and losses match the DDP engine's); fix: remove "
                             f"{key} or set enabled = false")


def _check_offload(part: str, value: Any, stage: int) -> None:
    if value is None:
        return
    where = f"deepspeed_config.zero_optimization.{part}"
    if not isinstance(value, dict):
        raise ValueError(f"{where}={value!r} must be a table (fix: write it as {{device = 'cpu'}})")
    for key in value:
        if key not in OFFLOAD_KEYS:
            raise ValueError(f"{where}.{key}=... is not supported (fix: remove it; supported: device, pin_memory)")
    device = value.get("device", "none")
    if device == "nvme":
        raise ValueError(f"{where}.device='nvme' is not supported: swapped state lives in DeepSpeed's swap files, "
                         "which trainmem's snapshots cannot capture (fix: device = 'cpu', or [placement] with a "
                         "disk tier)")
    if device not in ("cpu", "none"):
        raise ValueError(f"{where}.device={device!r} must be 'cpu' or 'none' (fix: one of those)")
    if part == "offload_param" and device == "cpu" and stage != 3:
        raise ValueError(f"{where}.device='cpu' needs zero_optimization.stage = 3 (parameters are partitioned "
                         f"only at stage 3; this config has stage {stage}); fix: set stage = 3 or remove offload_param")


def offloads_optimizer(table: dict[str, Any]) -> bool:
    return (table.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") == "cpu"


def build_deepspeed_json(table: dict[str, Any], *, batch_size: int, lr: float, weight_decay: float,
                         grad_clip: float) -> dict[str, Any]:
    """The user's checked ZeRO settings plus what trainmem sets: one micro-batch, AdamW, clipping.

    AdamW is torch's (``torch_adam``) unless the optimizer is offloaded, where DeepSpeed requires its
    own DeepSpeedCPUAdam (the same AdamW arithmetic, vectorised on the host).
    """
    check_deepspeed_config(table)
    params: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": list(BETAS), "eps": EPS}
    if not offloads_optimizer(table):
        params["torch_adam"] = True
    return {
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
        **{k: v for k, v in table.items() if k not in ("fp16", "bf16")},
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": params},
    }
