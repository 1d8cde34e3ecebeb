"""``trainmem launch JOB.toml``: validate the spec, run the controller, show progress, summarize."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import trainmem
from trainmem.checkpoint import CheckpointCorrupt, Location, LocationNotShared, existing_state
from trainmem.checkpoint.durable import atomic_write_text
from trainmem.runtime.config import JobSpec, check_environment, load_spec, resolve_paths
from trainmem.runtime.failure import InjectedFailure
from trainmem.runtime.spec_loader import ConfigError, build_dataclass

from .usage import Parser, UsageError, fail, first_line, write_traceback

SPEC_FILE = "spec.json"


def _parser() -> Parser:
    p = Parser(prog="trainmem launch", description="Train a job on Ray (embedded cluster unless cluster.address).")
    p.add_argument("job", nargs="?", help="job spec (.toml); omit with --resume")
    p.add_argument("--workers", type=int, help="override cluster.workers")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--run-dir", help="override train.run_dir")
    p.add_argument("--address", help="override cluster.address (join an existing Ray cluster)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest durable checkpoint")
    p.add_argument("--inject-failure", metavar="SPEC", help="rank=N,step=N[,kind=kill|hang] (tests, demos)")
    p.add_argument("--init-memory-from", metavar="RUN_DIR_OR_STORE",
                   help="start (or continue) with the memory-layer values of a run or a served memory store")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--launcher", choices=("ray", "mpirun"), default="ray",
                   help="ray: embedded or cluster.address; mpirun: under `mpirun -n N`, MPI starts the Ray cluster")
    return p


def _overrides(args) -> dict[str, dict]:
    pairs = {
        ("cluster", "workers"): args.workers,
        ("train", "steps"): args.steps,
        ("train", "seed"): args.seed,
        ("train", "run_dir"): args.run_dir,
        ("cluster", "address"): args.address,
    }
    out: dict[str, dict] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def resolve_spec(args) -> JobSpec:
    """The job file (or the resumed run's saved spec) plus command-line overrides, validated."""
    overrides = _overrides(args)
    if args.resume:
        if args.job:
            raise UsageError("trainmem launch: give a job file or --resume RUN_DIR, not both "
                             "(fix: trainmem launch --resume RUN_DIR [--steps N])")
        saved = Path(args.resume) / SPEC_FILE
        if not saved.is_file():
            raise ConfigError(str(saved), "<file>", "not a trainmem run folder", "pass the RUN_DIR a launch created")
        try:
            table = json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(str(saved), "<file>", f"unreadable ({e})", "pass the RUN_DIR a launch created") from None
        if not isinstance(table, dict):
            raise ConfigError(str(saved), "<file>", "not a job spec", "pass the RUN_DIR a launch created")
        for section, values in overrides.items():
            if not isinstance(table.setdefault(section, {}), dict):
                raise ConfigError(str(saved), section, "must be a table", "restore the run's spec.json")
            table[section].update(values)
        spec = build_dataclass(JobSpec, table, str(saved), "")
        check_environment(spec, str(saved), base=Path(args.resume))  # the same checks as a fresh launch
        resolve_paths(spec, job_name=Path(args.resume).name)
        return spec
    if not args.job:
        raise UsageError("trainmem launch: a job file is required (fix: trainmem launch JOB.toml, or --resume RUN_DIR)")
    spec = load_spec(args.job, overrides)
    try:
        found = existing_state(Location(spec.checkpoint_uri, spec.checkpoint.storage))
    except CheckpointCorrupt as e:
        found = [f"unreadable checkpoint state ({e})"]
    except OSError as e:  # S3: no such bucket, access denied, endpoint down
        raise ConfigError(args.job, "checkpoint.dir", f"{spec.checkpoint_uri} cannot be read ({first_line(e)})",
                          "check the bucket, [checkpoint.storage] endpoint and the AWS_* credentials") from None
    if found:
        raise ConfigError(
            args.job, "train.run_dir", f"{spec.run_dir} already holds {' and '.join(found)}",
            f"continue it with --resume {spec.run_dir}, or choose another run_dir",
        )
    return spec


def main(argv: list[str]) -> int:
    t0 = time.time()
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    if args.launcher == "mpirun":
        from .mpirun import MpiLaunchError, launch

        try:
            return launch(lambda: _prepare(args), lambda spec, address: _run(spec, args, t0, address),
                          lambda spec: str(spec.run_dir / "logs"), fail)
        except MpiLaunchError as e:
            print(f"trainmem launch: {e}", file=sys.stderr)
            return 1
    try:
        spec = _prepare(args)
    except (UsageError, ConfigError, ValueError) as e:
        return fail(str(e))
    return _run(spec, args, t0)


def _prepare(args) -> JobSpec:
    """The validated spec (UsageError, ConfigError or ValueError say what is wrong)."""
    spec = resolve_spec(args)
    args.inject = InjectedFailure.parse(args.inject_failure) if args.inject_failure else None
    if args.inject and args.inject.rank >= spec.cluster.workers:
        raise UsageError(f"--inject-failure: rank={args.inject.rank} but there are {spec.cluster.workers} workers")
    if args.launcher == "mpirun" and spec.cluster.address:
        raise UsageError(f"--launcher mpirun starts its own Ray cluster, but cluster.address={spec.cluster.address!r} "
                         "(fix: remove cluster.address / --address, or launch without --launcher mpirun)")
    if args.init_memory_from:
        from trainmem.memory_services import plan_memory_init

        try:  # one call: checks the source against the model, and says at which step it applies
            spec.model.init_memory_from, spec.model.init_memory_step = plan_memory_init(args.init_memory_from, spec)
        except ValueError as e:
            raise UsageError(f"trainmem launch: {e}") from None
    if spec.cluster.address and not trainmem.is_loopback_address(spec.cluster.address):
        if not trainmem.allow_cluster_addresses():
            raise UsageError(f"trainmem launch: cluster.address={spec.cluster.address!r} is another machine, which "
                             "needs Ray's cluster mode, but RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set (fix: unset it "
                             "or set it to 1)")
    return spec


def _run(spec: JobSpec, args, t0: float, address: str | None = None) -> int:
    """Run the controller (against ``address`` when a launcher started the cluster) and print the summary."""
    from trainmem.runtime.controller import Controller, JobFailed
    from trainmem.runtime.cluster import ClusterUnavailable

    spec.run_dir.mkdir(parents=True, exist_ok=True)
    # Saved before the launcher's address is set: a --resume starts (or is given) its own cluster.
    atomic_write_text(spec.run_dir / SPEC_FILE, json.dumps(dataclasses.asdict(spec), indent=1))
    if address is not None:
        spec.cluster.address = address
    console = Console(stderr=True)
    with _progress(console, spec) as (progress, task):
        def on_progress(record: dict) -> None:
            progress.update(task, completed=record["step"], loss=record["loss"], tps=record["tokens_per_s"])

        controller = Controller(spec, inject=args.inject, on_progress=on_progress, t0=t0, handle_sigterm=True)
        try:
            result = controller.run()
        except (JobFailed, ClusterUnavailable) as e:
            progress.stop()
            print(f"trainmem launch: {e}", file=sys.stderr)
            return 1
        except LocationNotShared as e:  # refused before any rank started: a layout to fix, not a crash
            progress.stop()
            print(f"trainmem launch: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # a fault of ours: one line for the user, the traceback in the run's logs
            progress.stop()
            log = write_traceback(spec.run_dir / "logs" / "driver.log", e)
            print(f"trainmem launch: internal error: {type(e).__name__}: {first_line(e)} (traceback in {log})",
                  file=sys.stderr)
            return 1
    if result.state == "preempted":
        saved = (f"saved step {result.preempted_step}" if result.preempted_step is not None
                 else "could not save in time (the newest checkpoint stands)")
        print(f"trainmem launch: preempted (SIGTERM): {saved}; continue with "
              f"trainmem launch --resume {spec.run_dir}", file=sys.stderr)
        return 143
    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "restarts": result.restarts,
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s,
        "params_sha256": result.params_sha256,
        "first_step_s": result.first_step_s,
        "peak_mem_bytes": result.peak_mem_bytes,
        "run_dir": result.run_dir,
    }
    rows = dict(summary)
    for i, r in enumerate(result.recoveries, 1):
        how = r["action"] + (f" ({', '.join(f'rank {k}: {v}' for k, v in r['replacement'].items())})"
                             if r["replacement"] else "")
        rows[f"failure {i}"] = f"{r['kind']} rank(s) {r['ranks']}: {how}"
        rows[f"failure {i} restored from"] = f"{r['tier']} step {r['restored_step']} ({r['lost_steps']} steps lost)"
        rows[f"failure {i} fault -> resumed (s)"] = r["fault_to_resumed_s"]
    _print_summary(Console(stderr=args.json), rows)
    if args.json:
        print(json.dumps({**summary, "recoveries": result.recoveries}))
    return 0


def _progress(console: Console, spec: JobSpec):
    progress = Progress(
        TextColumn("[bold]train[/bold] step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )

    class _Ctx:
        def __enter__(self):
            progress.start()
            return progress, progress.add_task("train", total=spec.train.steps, loss=float("nan"), tps=0.0)

        def __exit__(self, *exc):
            progress.stop()

    return _Ctx()


def _print_summary(console: Console, summary: dict) -> None:
    table = Table(title="trainmem launch: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
