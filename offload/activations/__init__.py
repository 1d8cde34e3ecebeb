"""Activation offload and token-wise recompute under a memory budget (the ``[memory]`` section)."""

from .config import ActivationConfig
from .meter import SavedBytesMeter
from .planner import (BlockProfile, Choice, CostModel, Plan, PlanInfeasible, PlanRow, build_plan, peak_points,
                      plan_blocks, predict_peak)
from .policy import ActivationPolicy, find_blocks
from .recompute import recompute
from .render import format_bytes, plan_table, plan_text
from .split import is_splittable, split_forward
from .stores import KeepStore, OffloadEngine

__all__ = ["ActivationConfig", "ActivationPolicy", "BlockProfile", "Choice", "CostModel", "KeepStore", "OffloadEngine",
           "Plan", "PlanInfeasible", "PlanRow", "SavedBytesMeter", "build_plan", "find_blocks", "format_bytes", "is_splittable",
           "peak_points", "plan_blocks", "plan_table", "plan_text", "predict_peak", "recompute", "split_forward"]
