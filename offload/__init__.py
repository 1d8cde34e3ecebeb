"""trainmem.offload: the memory tiers, activation offload/recompute and chunked parameter placement.

Public surface: the tiers (device arena, host pool, disk slot file) and the one copy engine
between them; the ``[memory]`` activation policy, its planner, plan table and meter; the
``[placement]`` config, planner, plan table and :class:`ChunkedEngine`.
"""

from .activations import (ActivationConfig, ActivationPolicy, BlockProfile, Choice, CostModel, KeepStore,
                          OffloadEngine, Plan, PlanInfeasible, PlanRow, SavedBytesMeter, build_plan, find_blocks,
                          format_bytes,
                          is_splittable, peak_points, plan_blocks, plan_table, plan_text, predict_peak, recompute,
                          split_forward)
from .params import (CHECKPOINT_FORMAT, ChunkedEngine, PlacementConfig, extensions_dir, PlacementInfeasible, PlacementPlan,
                     operators, parse_bytes, placement_table, plan_for_module, plan_placement,
                     state_dict_from_shards)
from .tiers import ArenaFull, CopyEngine, DeviceArena, DiskFull, DiskSlots, HostPool, HostPoolFull

__all__ = [
    "ActivationConfig", "ActivationPolicy", "ArenaFull", "BlockProfile", "CHECKPOINT_FORMAT", "Choice",
    "ChunkedEngine", "CopyEngine", "CostModel", "DeviceArena", "DiskFull", "DiskSlots", "HostPool", "HostPoolFull",
    "KeepStore", "OffloadEngine", "PlacementConfig", "PlacementInfeasible", "PlacementPlan", "Plan",
    "PlanInfeasible", "PlanRow", "SavedBytesMeter", "build_plan", "extensions_dir", "find_blocks", "format_bytes", "is_splittable", "operators",
    "parse_bytes", "peak_points", "placement_table", "plan_blocks", "plan_for_module", "plan_placement", "plan_table", "plan_text",
    "predict_peak", "recompute", "split_forward", "state_dict_from_shards",
]
