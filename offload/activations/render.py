"""The plan as a rich table (``trainmem plan`` and the job log)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .planner import Plan


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plan_table(plan: Plan) -> Table:
    """One row per block (decision, alpha, predicted device/host bytes and extra time), totals in the caption."""
    table = Table(title=f"activation plan: {plan.mode}", title_justify="left")
    for name, justify in (("block", "right"), ("decision", "left"), ("alpha", "right"), ("device", "right"),
                          ("host", "right"), ("recompute ms", "right"), ("copy ms", "right"), ("extra ms", "right")):
        table.add_column(name, justify=justify)
    for r in plan.rows:
        table.add_row(str(r.index), r.decision, "-" if r.alpha is None else f"{r.alpha:.3g}",
                      format_bytes(r.device_bytes), format_bytes(r.host_bytes), f"{1e3 * r.recompute_s:.1f}",
                      f"{1e3 * r.copy_s:.1f}", f"{1e3 * r.overhead_s:.1f}")
    overhead = plan.predicted_overhead_s / plan.baseline_step_s if plan.baseline_step_s > 0 else 0.0
    lines = [
        f"predicted peak {format_bytes(plan.predicted_peak)} (budget {format_bytes(plan.budget_bytes)}, "
        f"no-policy peak {format_bytes(plan.no_policy_peak)})",
        f"predicted overhead {1e3 * plan.predicted_overhead_s:.1f} ms/step = {100 * overhead:.1f}% of the "
        f"{1e3 * plan.baseline_step_s:.0f} ms warm-up step",
        f"host {format_bytes(plan.host_bytes)} of {format_bytes(plan.host_capacity)}; copy bandwidth "
        f"{plan.bandwidth_bytes_per_s / 1e9:.2f} GB/s ({'CUDA D2H' if plan.cuda else 'CPU memcpy'})",
        *plan.notes,
    ]
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def plan_text(plan: Plan, width: int = 120) -> str:
    """The table as plain text, for the job log."""
    console = Console(record=True, width=width, file=_Discard())
    console.print(plan_table(plan))
    return console.export_text()


class _Discard:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass
