"""trainmem.parallel: pipeline schedules with controllable memory — IR, generators, validator,
simulator, search and a torch.distributed executor; and the DeepSpeed ZeRO engine adapter
(:class:`DeepSpeedEngine`, configured by a checked DeepSpeed config).

A worker (rank r of an initialized process group of size p) runs a pipelined step like this::

    cfg = PipelineConfig(schedule="v-half", stages=p, microbatches=8)
    layout = layout_for(cfg, model_cfg.n_layer)          # per rank: [(stage, n_blocks), ...]
    counts = {s: n for row in layout for s, n in row}
    stages = split_into_stages(model, [counts[s] for s in sorted(counts)])
    ex = PipelineExecutor(build_schedule(cfg), r, {s: stages[s] for s, _ in layout[r]}, lm_loss,
                          timeout_s=cfg.timeout_s)
    stats = ex.step(list(zip(inputs.chunk(8), targets.chunk(8))))   # grads land in model's .grad
"""

from .activations import PipelinePolicy, in_flight
from .blocks import BuildingBlock, v_block, v_half, v_min
from .config import PipelineConfig, build_measured_schedule, build_schedule, layers_per_stage_for, layout_for
from .deepspeed_config import build_deepspeed_json, check_deepspeed_config
from .deepspeed_engine import DeepSpeedEngine
from .costs import LayerCost, RunCosts, layer_costs_record, profile_layers, read_run_costs
from .executor import PipelineError, PipelineExecutor, StepStats, executable
from .generators import gpipe, greedy, interleaved_1f1b, one_f_one_b, zb_h1, zb_h2, zb_v
from .comms import Message, Post, add_comms, comm_plan, order_mismatch
from .ir import Action, DeadlockError, Kind, Schedule, from_csv, loop_placement, to_csv, v_placement
from .mesh import PipelineMesh, mesh_groups
from .offload_pass import lifespans, selective_offload, with_offload
from .schedules import SCHEDULE_NAMES, even_layers, make_schedule, placement_for, stage_layout
from .search import Candidate, pick
from .simulate import Costs, SimResult, StageCost, order_peak, simulate
from .split import balance_layers, predict, stage_costs
from .stash import SavedBytesMeter
from .validate import ScheduleError, validate

__all__ = [
    "Action", "BuildingBlock", "Candidate", "Costs", "DeadlockError", "Kind", "LayerCost", "Message", "PipelineConfig",
    "PipelineError", "PipelineExecutor", "PipelineMesh", "PipelinePolicy", "Post", "SCHEDULE_NAMES", "SavedBytesMeter", "Schedule", "ScheduleError",
    "RunCosts", "SimResult", "DeepSpeedEngine", "build_deepspeed_json", "check_deepspeed_config", "StageCost", "StepStats", "add_comms", "balance_layers", "build_measured_schedule", "build_schedule", "comm_plan", "executable", "even_layers", "from_csv", "gpipe", "greedy", "in_flight",
    "interleaved_1f1b", "layer_costs_record", "lifespans", "layers_per_stage_for", "layout_for", "loop_placement", "make_schedule", "mesh_groups", "one_f_one_b", "order_mismatch", "order_peak",
    "pick", "placement_for", "predict", "profile_layers", "read_run_costs", "selective_offload", "simulate", "stage_costs", "stage_layout", "to_csv", "v_block", "v_half", "v_min",
    "v_placement", "validate", "with_offload", "zb_h1", "zb_h2", "zb_v",
]
