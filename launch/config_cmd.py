"""``trainmem config explain`` prints every job-spec key; ``trainmem config check JOB`` validates one."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from trainmem.runtime import ConfigError, load_spec
from trainmem.runtime.config import explain_rows

from .usage import fail


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("explain", "check"):
        return fail("trainmem config: expected 'explain' or 'check JOB.toml' (fix: trainmem config explain)")
    if argv[0] == "explain":
        table = Table(title="job spec keys ([section] key = default)")
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for row in explain_rows():
            table.add_row(*row)
        Console(width=160).print(table)
        return 0
    if len(argv) != 2:
        return fail("trainmem config check: expected one job file (fix: trainmem config check JOB.toml)")
    try:
        load_spec(argv[1])
    except ConfigError as e:
        return fail(str(e))
    print(f"{argv[1]}: ok")
    return 0
