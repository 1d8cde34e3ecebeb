"""``trainmem chaos JOB.toml --trials N [--seed S] [--kinds ...]``: random real faults, every run checked bitwise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainmem.runtime.config import load_spec
from trainmem.runtime.faults import KINDS, draw_plan
from trainmem.runtime.spec_loader import ConfigError

from .usage import Parser, UsageError, fail


def _parser() -> Parser:
    p = Parser(prog="trainmem chaos", description="Run a job under random faults; each run must end bitwise "
                                                  "equal to a fault-free one.")
    p.add_argument("job", help="job spec (.toml)")
    p.add_argument("--trials", type=int, default=8, help="how many faulty runs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="trial i draws its faults from seed*1000+i")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default all: {','.join(KINDS)})")
    p.add_argument("--replay", type=int, metavar="TRIAL_SEED", help="run the one trial with this seed (from a report)")
    p.add_argument("--nodes", type=int, default=3, help="raylets of the local cluster (default 3)")
    p.add_argument("--out", help="folder for the runs, chaos.json and chaos.png (default runs/chaos-<UTC time>)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise UsageError(f"trainmem chaos: --kinds: unknown {bad or 'none given'} (fix: choose from {', '.join(KINDS)})")
        if args.trials < 1 or args.nodes < 2:
            raise UsageError("trainmem chaos: need --trials >= 1 and --nodes >= 2")
        spec = load_spec(args.job)
    except (UsageError, ConfigError, ValueError) as e:
        return fail(str(e))
    if spec.cluster.address:
        return fail(f"trainmem chaos: {args.job}: cluster.address is set, but chaos starts and breaks its own local "
                    "cluster (fix: remove cluster.address)")
    from trainmem.runtime.chaos import ChaosRun, draw, summarize

    out = Path(args.out or f"runs/chaos-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}").resolve()
    seeds = [args.replay] if args.replay is not None else [args.seed * 1000 + i for i in range(args.trials)]
    plans = [draw_plan(s, kinds, spec.train.steps, spec.cluster.workers) for s in seeds]
    console = Console(stderr=True)
    trials = []
    with Progress(TextColumn("[bold]chaos[/bold] {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("chaos", total=len(plans) + 1, last="reference run")
        with ChaosRun(spec, out, nodes=args.nodes) as chaos:
            chaos.reference()
            progress.advance(task)
            for plan in plans:
                progress.update(task, last=f"trial {plan.seed}: {'+'.join(plan.kinds)}")
                result = chaos.trial(plan)
                trials.append(result)
                progress.advance(task)
                if not result.passed:
                    console.print(f"[red]trial {result.seed} ({'+'.join(result.kinds)}) failed[/red]: "
                                  f"{result.error or 'final parameters differ'}; replay with --replay {result.seed}")
    summary = summarize(trials)
    report = {"job": str(Path(args.job).resolve()), "reference_sha256": chaos.reference_sha, "kinds": summary,
              "passed": all(t.passed for t in trials), "trials": [t.to_json() for t in trials]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=1))
    draw(summary, out / "chaos.png")
    _print_table(Console(stderr=args.json, width=150), summary, out)
    if args.json:
        print(json.dumps(report))
    return 0 if report["passed"] else 1


def _print_table(console: Console, summary: dict, out: Path) -> None:
    t = Table(title=f"trainmem chaos ({out / 'chaos.json'}, {out / 'chaos.png'})")
    for col in ("fault kind", "trials", "recovered", "bitwise", "max lost steps", "median detect s",
                "median fault->resumed s"):
        t.add_column(col, justify="right")
    for kind, row in summary.items():
        t.add_row(kind, str(row["trials"]), str(row["recovered"]), str(row["bitwise"]), str(row["lost_steps"]),
                  "-" if row["median_detect_s"] is None else f"{row['median_detect_s']:.2f}",
                  "-" if row["median_recover_s"] is None else f"{row['median_recover_s']:.2f}")
    console.print(t)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
