"""The placement plan as a rich table (``trainmem plan``)."""

from __future__ import annotations

from rich.table import Table

from ..activations.render import format_bytes
from .planner import PlacementPlan


def placement_table(plan: PlacementPlan) -> Table:
    """Bytes per tier per state type, then bytes moved per step per tier pair; chunking in the caption."""
    table = Table(title=f"parameter placement (world {plan.world})", title_justify="left")
    for name, justify in (("tier", "left"), ("what", "left"), ("bytes", "right")):
        table.add_column(name, justify=justify)
    for tier, states in plan.bytes_per_tier.items():
        for what, n in states.items():
            table.add_row(tier, what, format_bytes(n))
    for pair, n in plan.moved_per_step.items():
        table.add_row("moved/step", pair, format_bytes(n))
    table.caption = "\n".join([
        f"chunk {format_bytes(plan.chunk_bytes)} ({plan.chunk_search}), {plan.n_chunks} chunks, waste "
        f"{format_bytes(plan.waste_bytes)} ({100 * plan.waste_fraction:.2f}%)",
        f"arena {plan.arena_slots} slots (working set needs {plan.min_slots}); host "
        f"{format_bytes(plan.host_bytes)}; disk {format_bytes(plan.disk_bytes)}",
        f"homes: {', '.join(f'{k}={v}' for k, v in plan.homes.items())}",
        f"minimum host->device per step (each chunk once): {format_bytes(plan.min_host_to_device_per_step)}",
        *plan.notes])
    table.caption_justify = "left"
    return table
