"""The ``trainmem`` command. Each subcommand lives in the package that owns it; this file dispatches.

Every subcommand module exposes ``main(argv: list[str]) -> int``. Usage errors exit 2 with one
line naming what was wrong and how to fix it; no tracebacks for bad input.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("trainmem.launch.launch_cmd", "train a job on Ray: trainmem launch JOB.toml [--workers N] [--steps N]"),
    "config": ("trainmem.launch.config_cmd", "explain or check a job spec: trainmem config explain|check [JOB.toml]"),
    "plan": ("trainmem.launch.plan_cmd", "print the activation-memory plan of a job: trainmem plan JOB.toml"),
    "schedule": ("trainmem.parallel.cli", "pipeline schedules: trainmem schedule show|pick ..."),
    "serve": ("trainmem.launch.serve_cmd", "start memory services: trainmem serve examples/memory.toml"),
    "consolidate": ("trainmem.launch.consolidate_cmd", "run memory consolidation: --once | --schedule CRON"),
    "chaos": ("trainmem.launch.chaos_cmd", "random real faults, each run checked bitwise: trainmem chaos JOB.toml --trials N"),
    "export": ("trainmem.launch.export_cmd", "newest intact checkpoint as safetensors: trainmem export RUN_DIR OUT"),
    "plot": ("trainmem.launch.plot_cmd", "draw a run's loss, throughput and memory: trainmem plot RUN_DIR"),
    "bench": ("trainmem.launch.bench_cmd", "benchmarks beside their anchors: trainmem bench NAME [--json]"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: trainmem COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from trainmem import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trainmem: unknown command {name!r} (fix: one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"trainmem {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # no traceback reaches the user: one line, the rest in a file
        from .usage import first_line, write_traceback

        log = write_traceback(None, e)
        print(f"trainmem {name}: internal error: {type(e).__name__}: {first_line(e)} (traceback in {log})",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
