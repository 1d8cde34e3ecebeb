"""``trainmem schedule show|pick|validate|list``: generate, simulate, draw and pick schedules."""

from __future__ import annotations

import argparse
import json
import sys

from .ir import from_csv, to_csv
from .offload_pass import with_offload
from .schedules import SCHEDULE_NAMES, canonical, make_schedule, placement_for
from .search import pick
from .simulate import Costs, SimResult, simulate
from .validate import ScheduleError, validate


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (not argparse's usage dump)
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="trainmem schedule", description="pipeline schedules: show | pick | validate | list")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    show = sub.add_parser("show", help="simulate one schedule and print its figures")
    show.add_argument("name", help=" | ".join(SCHEDULE_NAMES))
    _common(show)
    show.add_argument("-v", "--chunks", type=int, default=None, help="chunks per rank (interleaved)")
    show.add_argument("--offload", action="store_true", help="insert OFFLOAD/RELOAD")
    show.add_argument("--png", help="write the timeline here")
    show.add_argument("--csv", help="write the schedule as CSV (one row per rank) here")
    show.add_argument("--torch-names", action="store_true", help="CSV with torch's letters (F, I, W, B)")
    show.add_argument("--text", action="store_true", help="print every rank's actions")
    pk = sub.add_parser("pick", help="fastest schedule whose peak memory fits --budget")
    _common(pk)
    pk.add_argument("--budget", type=float, required=True, help="peak activation memory per rank, in M_B")
    pk.add_argument("--no-offload", action="store_true", help="do not consider offloaded variants")
    val = sub.add_parser("validate", help="check a CSV schedule (one row per rank)")
    val.add_argument("file")
    val.add_argument("--layout", default="1f1b", help="schedule name whose placement the CSV uses")
    _common(val)
    val.add_argument("--torch-names", action="store_true")
    sub.add_parser("list", help="schedule names")
    return ap


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-p", type=int, required=True, help="pipeline ranks")
    sp.add_argument("-m", type=int, required=True, help="microbatches")
    sp.add_argument("--costs", default="1,1,1", help="F,B,W[,COMM[,OFFLOAD]] per rank's layers (default 1,1,1)")
    sp.add_argument("--json", action="store_true", help="last line: one JSON object")


def _table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    Console().print(table)


def _show(args) -> int:
    costs = Costs.parse(args.costs)
    sched = make_schedule(args.name, args.p, args.m, args.chunks)
    if args.offload:
        sched = with_offload(sched)
    validate(sched)
    sim: SimResult = simulate(sched, costs)
    if args.text:
        print(sched.to_text())
    _table([{"rank": r, "bubble": sim.bubble_per_rank[r], "peak M_B": sim.peak_mb[r]} for r in range(args.p)],
           f"{sched.name} p={args.p} m={args.m} v={sched.v}: bubble {sim.bubble:.4f}, makespan {sim.makespan:g}")
    if args.png:
        from .plot import draw_timeline

        draw_timeline(sim, args.png, f"{sched.name} p={args.p} m={args.m}: bubble {sim.bubble:.4f}")
        print(f"timeline written to {args.png}")
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write(to_csv(sched, torch_names=args.torch_names))
    if args.json:
        print(json.dumps({"schedule": sched.name, "p": args.p, "m": args.m, "v": sched.v, **sim.as_dict()}))
    return 0


def _pick(args) -> int:
    costs = Costs.parse(args.costs)
    best, cands = pick(args.p, args.m, args.budget, costs, offload=not args.no_offload)
    rows = [{"schedule": c.name + ("+offload" if c.offload else ""), "makespan": c.sim.makespan,
             "bubble": c.sim.bubble, "max peak M_B": max(c.sim.peak_mb),
             "fits": "yes" if max(c.sim.peak_mb) <= args.budget + 1e-9 else "no"} for c in cands]
    _table(rows, f"p={args.p} m={args.m} budget {args.budget:g} M_B, costs {args.costs}")
    if best is None:
        print(f"no schedule fits a budget of {args.budget:g} M_B (smallest peak: "
              f"{min(max(c.sim.peak_mb) for c in cands):g}); raise --budget", file=sys.stderr)
        if args.json:
            print(json.dumps({"schedule": None, "budget": args.budget}))
        return 1
    print(f"pick: {best.name}{' with offload' if best.offload else ''} (makespan {best.sim.makespan:g}, "
          f"peak {max(best.sim.peak_mb):g} M_B)")
    if args.json:
        print(json.dumps({"budget": args.budget, **best.as_dict()}))
    return 0


def _validate(args) -> int:
    with open(args.file) as fh:
        text = fh.read()
    placement = placement_for(args.layout, args.p)
    sched = from_csv(text, name=args.file, m=args.m, placement=placement, torch_names=args.torch_names)
    validate(sched)
    sim = simulate(sched, Costs.parse(args.costs))
    print(f"{args.file}: valid; bubble {sim.bubble:.4f}, peak M_B {sim.peak_mb}")
    if args.json:
        print(json.dumps({"valid": True, **sim.as_dict()}))
    return 0


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.cmd == "list":
            print("\n".join(SCHEDULE_NAMES))
            return 0
        if args.cmd in ("show", "pick"):
            canonical(args.name) if args.cmd == "show" else None
        return {"show": _show, "pick": _pick, "validate": _validate}[args.cmd](args)
    except _UsageError as exc:
        print(f"trainmem schedule: {exc} (see trainmem schedule --help)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except ScheduleError as exc:
        print(f"trainmem schedule: invalid schedule: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"trainmem schedule: {exc}", file=sys.stderr)
        return 2
