"""trainmem.offload: activation offload and token-wise recompute under a memory budget.

Public surface: the ``[memory]`` config, the per-block policy (wrap, measure, plan, step), the plan
as data and as a table, the saved-activation meter and the host buffer pool.
"""

from .config import ActivationConfig
from .meter import SavedBytesMeter
from .planner import (BlockProfile, Choice, CostModel, Plan, PlanInfeasible, PlanRow, peak_points, plan_blocks,
                      predict_peak)
from .policy import ActivationPolicy, find_blocks
from .pool import HostPool, HostPoolFull
from .recompute import recompute
from .render import format_bytes, plan_table, plan_text
from .split import is_splittable, split_forward
from .stores import KeepStore, OffloadEngine

__all__ = [
    "ActivationConfig",
    "ActivationPolicy",
    "BlockProfile",
    "Choice",
    "CostModel",
    "HostPool",
    "HostPoolFull",
    "KeepStore",
    "OffloadEngine",
    "Plan",
    "PlanInfeasible",
    "PlanRow",
    "SavedBytesMeter",
    "find_blocks",
    "format_bytes",
    "is_splittable",
    "plan_blocks",
    "plan_table",
    "plan_text",
    "peak_points",
    "predict_peak",
    "recompute",
    "split_forward",
]
