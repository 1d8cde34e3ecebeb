"""Draw a simulated timeline (one row per rank, copy engine beneath) to a PNG with matplotlib."""

from __future__ import annotations

from .ir import Kind
from .simulate import SimResult

_COLORS = {Kind.F: "#4c72b0", Kind.B: "#dd8452", Kind.W: "#55a868", Kind.BW: "#c44e52",
           Kind.OFFLOAD: "#8172b3", Kind.RELOAD: "#937860"}


def draw_timeline(sim: SimResult, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = len(sim.timeline)
    fig, ax = plt.subplots(figsize=(max(8.0, sim.makespan * 0.35), 0.6 * p + 1.2))
    for r, slots in enumerate(sim.timeline):
        for s in slots:
            y = p - 1 - r + (0.0 if s.engine == "compute" else -0.3)
            h = 0.8 if s.engine == "compute" else 0.25
            ax.broken_barh([(s.start, s.end - s.start)], (y, h), facecolors=_COLORS[s.action.kind], edgecolor="white")
            if s.engine == "compute" and s.end - s.start >= 0.4:
                ax.text((s.start + s.end) / 2, y + h / 2, str(s.action.mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks([p - 1 - r + 0.4 for r in range(p)], [f"rank {r}" for r in range(p)])
    ax.set_xlabel("time")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, [k.value for k in _COLORS], ncol=len(_COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=8)
    ax.set_title(title or f"bubble {sim.bubble:.4f}, peak M_B {max(sim.peak_mb):g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
