"""Chunked parameter placement (the ``[placement]`` section): chunks over device, host and disk."""

from .config import PlacementConfig, parse_bytes
from .engine import CHECKPOINT_FORMAT, ChunkedEngine, operators
from .export import state_dict_from_shards
from .layout import ChunkLayout, ParamSlot, build_layout
from .optim import HostAdamW, extensions_dir
from .planner import PlacementInfeasible, PlacementPlan, plan_for_module, plan_placement, static_trace
from .render import placement_table
from .trace import Moment, NextUse, Policy, SimResult, Trace, min_slots, simulate

__all__ = ["CHECKPOINT_FORMAT", "ChunkLayout", "ChunkedEngine", "HostAdamW", "Moment", "NextUse", "ParamSlot",
           "PlacementConfig", "PlacementInfeasible", "PlacementPlan", "Policy", "SimResult", "Trace", "build_layout", "extensions_dir",
           "min_slots", "operators", "parse_bytes", "placement_table", "plan_for_module", "plan_placement", "simulate",
           "state_dict_from_shards", "static_trace"]
