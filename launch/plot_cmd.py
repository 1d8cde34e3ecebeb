"""``trainmem plot RUN_DIR [--png out.png]``: loss, throughput and memory over steps, failures marked."""

from __future__ import annotations

from pathlib import Path

from trainmem.runtime.runlog import read_jsonl

from .usage import Parser, UsageError, fail

_MARKS = {"failure_detected": ("red", "failure"), "restored": ("green", "restored")}


def main(argv: list[str]) -> int:
    p = Parser(prog="trainmem plot", description="Draw a run's metrics.jsonl and events.jsonl as a PNG.")
    p.add_argument("run_dir")
    p.add_argument("--png", help="output file (default RUN_DIR/run.png)")
    try:
        args = p.parse_args(argv)
    except UsageError as e:
        return fail(str(e))
    run = Path(args.run_dir)
    metrics = read_jsonl(run / "metrics.jsonl")
    if not metrics:
        return fail(f"trainmem plot: {run / 'metrics.jsonl'} has no steps (fix: pass a run folder that trained)")
    out = Path(args.png) if args.png else run / "run.png"
    draw(metrics, read_jsonl(run / "events.jsonl"), out)
    print(out)
    return 0


def draw(metrics: list[dict], events: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = metrics[0]["time"] - metrics[0]["step_time_s"]
    panels = [("loss", "loss"), ("tokens_per_s", "tokens/s"), ("peak_mem_bytes", "peak memory (GiB)")]
    gpu_rows = [m for m in metrics if m.get("gpus")]
    fig, axes = plt.subplots(len(panels) + bool(gpu_rows), 1, figsize=(9, 7 + 2 * bool(gpu_rows)), sharex=True)
    if gpu_rows:
        _gpu_memory(axes[-1], gpu_rows, t0)
    for ax, (key, label) in zip(axes, panels):
        for attempt in sorted({m["attempt"] for m in metrics}):
            rows = [m for m in metrics if m["attempt"] == attempt]
            scale = 2**-30 if key == "peak_mem_bytes" else 1
            ax.plot([m["time"] - t0 for m in rows], [m[key] * scale for m in rows], label=f"attempt {attempt}")
        ax.set_ylabel(label)
        for e in events:
            if e["event"] in _MARKS:
                ax.axvline(e["time"] - t0, color=_MARKS[e["event"]][0], linestyle="--", linewidth=1)
    for e in events:
        if e["event"] in _MARKS and gpu_rows:
            axes[-1].axvline(e["time"] - t0, color=_MARKS[e["event"]][0], linestyle="--", linewidth=1)
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("seconds since the first step began (red: failure detected, green: restored)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _gpu_memory(ax, rows: list[dict], t0: float) -> None:
    """Rank 0's GPUs (NVML): memory used per GPU, with each GPU's total as a dotted line."""
    for index in sorted({g["index"] for m in rows for g in m["gpus"]}):
        points = [(m["time"] - t0, g) for m in rows for g in m["gpus"] if g["index"] == index]
        line, = ax.plot([t for t, _ in points], [g["mem_used_bytes"] * 2**-30 for _, g in points], label=f"GPU {index}")
        ax.axhline(points[-1][1]["mem_total_bytes"] * 2**-30, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_ylabel("GPU memory used (GiB)")
    ax.legend(loc="upper right")
