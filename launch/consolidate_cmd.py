"""``trainmem consolidate [FILE.toml] --once | --schedule CRON``: run the memory consolidation job.

Reads the ``[services]`` table (store, consolidation, memory layer). ``--once`` runs one job
and prints its result; ``--schedule`` runs it at each cron tick until interrupted. A run already
going elsewhere (the cron thread of `trainmem serve`, an HTTP request, another CLI) holds the
lease: ``--once`` then exits 3 naming the holder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from trainmem.runtime.spec_loader import ConfigError

from .serve_cmd import load_services


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"trainmem consolidate: {message} (fix: trainmem consolidate [FILE.toml] --once | --schedule CRON)",
              file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainmem consolidate", description="Run memory consolidation on the [services] store.")
    p.add_argument("file", nargs="?", default="examples/memory.toml", help="TOML file with a [services] table")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="run one job now")
    mode.add_argument("--schedule", metavar="CRON", help="cron expression, e.g. '*/10 * * * *'")
    p.add_argument("--max-runs", type=int, default=None, help="with --schedule: stop after N runs")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line")
    p.add_argument("--inject-kill", metavar="POINT", help="fault tests: SIGKILL this process at POINT (see faults.py)")
    return p


LEASE_HELD = 3


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_services(args.file)
        if args.schedule is not None:
            cfg = dataclasses.replace(
                cfg, consolidation=dataclasses.replace(cfg.consolidation, schedule=args.schedule)
            )
    except ConfigError as e:
        print(f"trainmem consolidate: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad --schedule fails the config's own check
        print(f"trainmem consolidate: --schedule: {e}", file=sys.stderr)
        return 2
    if args.max_runs is not None and args.max_runs <= 0:
        print("trainmem consolidate: --max-runs must be > 0", file=sys.stderr)
        return 2
    from trainmem.memory_services import ConsolidationJob, CronScheduler, LeaseHeld, MemoryStore, ensure_layer_chain
    from trainmem.memory_services.faults import ENV, POINTS

    if args.inject_kill is not None:
        if args.inject_kill not in POINTS:
            print(f"trainmem consolidate: --inject-kill {args.inject_kill!r} (fix: one of {', '.join(POINTS)})",
                  file=sys.stderr)
            return 2
        os.environ[ENV] = args.inject_kill
    try:
        store = MemoryStore(cfg.store_path, cfg.embedding_dim)
        if cfg.consolidation.distill:
            ensure_layer_chain(store, cfg)
    except ValueError as e:
        print(f"trainmem consolidate: {args.file}: services.{e}", file=sys.stderr)
        return 2
    job = ConsolidationJob(
        store, cfg.consolidation, layer_cfg=cfg.memory_layer.layer_config(), kind="cli", layer_dir=cfg.layer_dir,
        on_phase=lambda phase: print(f"consolidate: {phase}", flush=True),
    )
    if args.once:
        try:
            result = job.run_once()
        except LeaseHeld as e:
            print(f"trainmem consolidate: not run: {e}", file=sys.stderr, flush=True)
            if args.json:
                print(json.dumps({"ran": False, "holder": e.holder}), flush=True)
            return LEASE_HELD
        print(json.dumps(dataclasses.asdict(result)) if args.json else
              f"consolidate: merged {result.merged} entries into {result.clusters} "
              f"(conflicts {result.conflicts}, watermark {result.watermark}, {result.seconds:.2f}s)", flush=True)
        return 0
    scheduler = CronScheduler(job, cfg.consolidation.schedule, log=lambda m: print(m, flush=True))
    try:
        scheduler.run(max_runs=args.max_runs)
    except KeyboardInterrupt:
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
