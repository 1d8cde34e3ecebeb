"""``trainmem schedule show|pick|validate|list``: generate, simulate, draw and pick schedules."""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from .costs import read_run_costs
from .ir import from_csv, to_csv
from .offload_pass import with_offload
from .schedules import SCHEDULE_NAMES, canonical, make_schedule, placement_for
from .search import pick
from .simulate import Costs, SimResult, simulate
from .split import balance_layers, predict
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
    pk = sub.add_parser("pick", help="fastest schedule whose peak memory fits the budget")
    _common(pk, required=False)
    budget = pk.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", type=float, help="peak activation memory per rank, in M_B (unit costs)")
    budget.add_argument("--budget-bytes", type=float, help="peak saved-activation bytes per rank (with --from-run)")
    pk.add_argument("--from-run", metavar="RUN_DIR", help="use the per-layer costs a job measured and recorded "
                    "(events.jsonl layer_costs); -p/-m default to the job's")
    pk.add_argument("--no-offload", action="store_true", help="do not consider offloaded variants")
    val = sub.add_parser("validate", help="check a CSV schedule (one row per rank)")
    val.add_argument("file")
    val.add_argument("--layout", default="1f1b", help="schedule name whose placement the CSV uses")
    _common(val)
    val.add_argument("--torch-names", action="store_true")
    sub.add_parser("list", help="schedule names")
    return ap


def _common(sp: argparse.ArgumentParser, required: bool = True) -> None:
    sp.add_argument("-p", type=int, required=required, help="pipeline ranks")
    sp.add_argument("-m", type=int, required=required, help="microbatches")
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
    if not args.from_run and args.budget is None:
        raise _UsageError("--budget-bytes needs --from-run RUN_DIR (measured bytes); with unit costs use --budget M_B")
    if args.from_run and args.budget_bytes is None:
        raise _UsageError("with --from-run the budget is in bytes: use --budget-bytes N")
    run = read_run_costs(args.from_run) if args.from_run else None
    p = args.p if args.p is not None else (run.pipeline.get("stages") if run else None)
    m = args.m if args.m is not None else (run.pipeline.get("microbatches") if run else None)
    if p is None or m is None:
        raise _UsageError("pick needs -p and -m (or --from-run RUN_DIR to take the job's)")
    if run is not None:
        costs = Costs(f=costs.f, b=costs.b, w=costs.w, comm=run.comm_s, offload=costs.offload)
    budget = args.budget if run is None else args.budget_bytes
    best, cands = pick(p, m, budget, costs, offload=not args.no_offload,
                       layers=run.layers if run else None, copy_bytes_per_s=run.copy_bytes_per_s if run else None)
    unit = "M_B" if run is None else "bytes"
    rows = [{"schedule": c.name + ("+offload" if c.offload else ""),
             ("makespan" if run is None else "predicted step s"): c.sim.makespan, "bubble": c.sim.bubble,
             f"max peak {unit}": c.peak if run is None else f"{int(c.peak):,}",
             **({"split": ",".join(map(str, c.layers_per_stage))} if run else {}),
             "fits": "yes" if c.peak <= budget * (1 + 1e-9) else "no"} for c in cands]
    source = f"costs measured by {args.from_run}" if run else f"costs {args.costs}"
    _table(rows, f"p={p} m={m} budget {budget:g} {unit}, {source}")
    report = _run_report(run, p, m) if run else None
    if report:
        print(f"the job ran {report['schedule']} (p={p}, m={m}): measured step {report['measured_step_s']:.4f} s "
              f"(median of {report['steps']}), simulator predicts {report['predicted_step_s']:.4f} s "
              f"({report['error'] * 100:+.1f}%)")
    if best is None:
        print(f"no schedule fits a budget of {budget:g} {unit} (smallest peak: "
              f"{min(c.peak for c in cands):g}); raise the budget", file=sys.stderr)
        if args.json:
            print(json.dumps({"schedule": None, "budget": budget, "unit": unit, "run": report}))
        return 1
    print(f"pick: {best.name}{' with offload' if best.offload else ''} ({'makespan' if run is None else 'predicted step'} "
          f"{best.sim.makespan:g}{'' if run is None else ' s'}, peak {best.peak:g} {unit})")
    if args.json:
        print(json.dumps({"budget": budget, "unit": unit, **best.as_dict(), "run": report}))
    return 0


def _run_report(run, p: int, m: int) -> dict | None:
    """The job's own schedule: its measured step time beside the simulator's prediction."""
    name = run.pipeline.get("schedule")
    if not run.measured_step_s or not name or (run.pipeline.get("stages"), run.pipeline.get("microbatches")) != (p, m):
        return None
    sched = make_schedule(name, p, m)
    split = run.pipeline.get("layers_per_stage") or balance_layers(run.layers, sched.n_stages)
    predicted = predict(sched, run.layers, split, comm_s=run.comm_s).makespan
    measured = statistics.median(run.measured_step_s)
    return {"schedule": name, "layers_per_stage": list(split), "measured_step_s": measured,
            "steps": len(run.measured_step_s), "predicted_step_s": predicted, "error": predicted / measured - 1}


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
