"""The placement plan: chunk size, where each state type lives, bytes per tier and bytes moved per step.

Pure arithmetic over parameter shapes and an operator order, so ``trainmem plan`` and ``trainmem
config check`` refuse an infeasible budget before anything runs, naming the key and the smallest
value that works. The engine re-checks against the trace it records in its warm-up step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import PlacementConfig, host_limit_bytes
from .layout import ELEM, STATES, ChunkLayout, build_layout, candidate_sizes, waste_elems
from .trace import Trace, min_slots, simulate

STAGING_SETS = 3  # the optimizer pipeline: read next, update current, write previous
DISK_ORDER = ("exp_avg_sq", "exp_avg", "grad", "param")  # moved to disk first: read/written once per step


class PlacementInfeasible(ValueError):
    """A budget cannot hold the working set. ``key`` is the config key, ``smallest`` the least value that works."""

    def __init__(self, key: str, message: str, smallest: int | None):
        super().__init__(f"{key}={message}")
        self.key, self.smallest = key, smallest


@dataclass(kw_only=True)
class PlacementPlan:
    world: int
    chunk_bytes: int
    n_chunks: int
    waste_bytes: int
    waste_fraction: float
    chunk_search: str
    device_bytes: int
    arena_slots: int
    min_slots: int
    homes: dict[str, str]
    staging_bytes: int
    bytes_per_tier: dict[str, dict[str, int]]
    moved_per_step: dict[str, int]
    min_host_to_device_per_step: int
    host_bytes: int
    disk_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def static_trace(op_params: list[list[int]], layout: ChunkLayout) -> Trace:
    """The moments the engine will see, from the operators' forward order: each operator's chunks in
    forward; in backward (reverse order) each operator's chunks unpacked, then its gradients land."""
    chunk_of = {s.index: s.chunk for s in layout.slots}
    pending = {c: len(layout.chunk_params(c)) for c in range(layout.n_chunks)}
    trace = Trace()
    for op, params in enumerate(op_params):
        trace.add(("F", op), {chunk_of[p] for p in params})
    open_grads: set[int] = set()
    for params in reversed(op_params):
        chunks = sorted({chunk_of[p] for p in params})
        during = len(open_grads | set(chunks))  # this operator's gradients open their chunks while it runs
        for c in chunks:
            trace.add(("U", c), [c], during)
        for p in params:
            c = chunk_of[p]
            open_grads.add(c)
            pending[c] -= 1
            if pending[c] == 0:
                open_grads.discard(c)
    return trace


def slots_needed(trace: Trace, world: int) -> int:
    return min_slots(trace, reduce_buffer=1 if world > 1 else 0)


def _choose_chunk(params, order, op_params, cfg: PlacementConfig, world: int) -> tuple[ChunkLayout, Trace, str]:
    device = cfg.device_budget
    if cfg.chunk_budget is not None:
        elems = cfg.chunk_budget // ELEM
        smallest = candidate_sizes(params, world)[0]
        if elems < smallest or elems % (world * 1024):
            need = max(smallest, -(-elems // (world * 1024)) * world * 1024)
            raise PlacementInfeasible(
                "placement.chunk_bytes", f"{cfg.chunk_bytes!r} cannot hold the largest parameter in one of "
                f"{world} shards: the smallest value that works is {need * ELEM}", need * ELEM)
        layout = build_layout(params, order, elems, world)
        trace = static_trace(op_params, layout)
        return layout, trace, "given"
    best, fallback = None, None
    for size in candidate_sizes(params, world, high=max(device // ELEM // 2, 1)):
        layout = build_layout(params, order, size, world)
        trace = static_trace(op_params, layout)
        need = slots_needed(trace, world) * size * ELEM
        if fallback is None or need < fallback:
            fallback = need
        if need <= device:
            waste = waste_elems(params, order, size, world)
            if best is None or waste < best[0]:
                best = (waste, layout, trace)
    if best is None:
        raise PlacementInfeasible("placement.device_bytes", f"{cfg.device_bytes!r} cannot hold the working set "
                                  f"(the largest operator's chunks plus open gradient chunks): the smallest value "
                                  f"that works is {fallback}", fallback)
    return best[1], best[2], "auto (least waste)"


def plan_placement(params: list[tuple[str, tuple[int, ...]]], op_params: list[list[int]], cfg: PlacementConfig, *,
                   world: int, micro_batches: int | None = None) -> PlacementPlan:
    """The plan for ``params`` (name, shape) used by operators ``op_params`` (param indices, forward order).
    Raises :class:`PlacementInfeasible` naming the key and the smallest value that works."""
    return plan_with_layout(params, op_params, cfg, world=world, micro_batches=micro_batches)[0]


def plan_for_module(model, cfg: PlacementConfig, *, world: int) -> PlacementPlan:
    """The plan for a module's parameters and operators (a meta-device module is enough: no weights)."""
    from .engine import operators

    params = list(model.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(params)}
    op_params = [[index[id(p)] for p in op.parameters(recurse=False)] for op in operators(model)]
    return plan_placement([(n, tuple(p.shape)) for n, p in params], op_params, cfg, world=world)


def plan_with_layout(params: list[tuple[str, tuple[int, ...]]], op_params: list[list[int]], cfg: PlacementConfig, *,
                     world: int, micro_batches: int | None = None,
                     order: list[int] | None = None) -> tuple[PlacementPlan, ChunkLayout]:
    if order is None:
        order = []
        for ps in op_params:
            order.extend(p for p in ps if p not in order)
        order.extend(i for i in range(len(params)) if i not in order)
    k = micro_batches or cfg.micro_batches
    layout, trace, how = _choose_chunk(params, order, op_params, cfg, world)
    chunk_bytes, shard = layout.chunk_bytes, layout.shard_bytes
    need_slots = slots_needed(trace, world)
    n_slots = cfg.device_budget // chunk_bytes
    if n_slots < need_slots:
        smallest = need_slots * chunk_bytes
        raise PlacementInfeasible("placement.device_bytes", f"{cfg.device_bytes!r} holds {n_slots} chunks of "
                                  f"{chunk_bytes} bytes but the working set needs {need_slots}: the smallest value "
                                  f"that works is {smallest}", smallest)
    per_state = layout.n_chunks * shard
    homes, host_need = _homes(cfg, per_state, shard)
    disk_states = [s for s in STATES if homes[s] == "disk"]
    staging = STAGING_SETS * len(disk_states) * shard
    disk_need = len(disk_states) * layout.n_chunks * (-(-shard // 4096) * 4096)
    if disk_need > cfg.disk_budget:
        raise PlacementInfeasible("placement.disk_bytes", f"{cfg.disk_bytes!r} is too small for the states the host "
                                  f"budget sends to disk ({', '.join(disk_states)}): the smallest value that works is "
                                  f"{disk_need}", disk_need)
    capacity = n_slots - max(trace.max_grads_open(), 1) - (1 if world > 1 else 0)
    misses = simulate(trace.needs(), max(capacity, max(len(n) for n in trace.needs())), pin_previous=True).misses
    moved = {"host->device": misses * shard, "device->host": k * layout.n_chunks * shard}
    if world > 1:
        moved["network"] = misses * (chunk_bytes - shard) + k * layout.n_chunks * (chunk_bytes - shard)
    disk_read = disk_write = 0
    for s in disk_states:
        if s == "param":
            disk_read += misses * shard + per_state
            disk_write += per_state
        elif s == "grad":
            disk_write += k * per_state
            disk_read += (k - 1) * per_state + per_state
        else:
            disk_read += per_state
            disk_write += per_state
    if disk_states:
        moved["disk->host"], moved["host->disk"] = disk_read, disk_write
    tiers = {"device": {"arena (param + grad chunks)": n_slots * chunk_bytes},
             "host": {s: per_state for s in STATES if homes[s] == "host"},
             "disk": {s: per_state for s in disk_states}}
    tiers["host"]["fp32 master"] = 0
    if staging:
        tiers["host"]["disk staging"] = staging
    notes = [f"chunks of {layout.n_chunks} x {chunk_bytes} bytes, {world} shard(s) each; "
             f"{len(layout.slots)} parameters ({layout.param_elems} elements)",
             "fp32 master: the fp32 parameters themselves (no separate copy)"]
    return PlacementPlan(
        world=world, chunk_bytes=chunk_bytes, n_chunks=layout.n_chunks, waste_bytes=layout.waste_elems * ELEM,
        waste_fraction=layout.waste_fraction, chunk_search=how, device_bytes=n_slots * chunk_bytes,
        arena_slots=n_slots, min_slots=need_slots, homes=homes, staging_bytes=staging, bytes_per_tier=tiers,
        moved_per_step=moved, min_host_to_device_per_step=layout.n_chunks * shard,
        host_bytes=host_need, disk_bytes=disk_need, notes=notes), layout


def _homes(cfg: PlacementConfig, per_state: int, shard: int) -> tuple[dict[str, str], int]:
    """Fewest states on disk that fit the host budget: (state -> tier, host bytes needed)."""
    budget = cfg.host_budget
    limit, what = host_limit_bytes()
    for n_disk in range(0, len(STATES) + 1 if cfg.disk_path else 1):
        on_disk = set(DISK_ORDER[:n_disk])
        need = (len(STATES) - n_disk) * per_state + STAGING_SETS * n_disk * shard
        if (budget is None and need <= limit) or (budget is not None and need <= budget):
            return {s: "disk" if s in on_disk else "host" for s in STATES}, need
    n_disk = len(STATES) if cfg.disk_path else 0
    smallest = (len(STATES) - n_disk) * per_state + STAGING_SETS * n_disk * shard
    if budget is None:
        raise PlacementInfeasible("placement.host_bytes", f"unset needs {smallest} bytes, above {what} ({limit}) "
                                  "(fix: set placement.disk_path and disk_bytes)", smallest)
    hint = "" if cfg.disk_path else " without a disk tier (or set placement.disk_path and disk_bytes)"
    raise PlacementInfeasible("placement.host_bytes", f"{cfg.host_bytes!r} cannot hold this rank's shards: the "
                              f"smallest value that works is {smallest}{hint}", smallest)
