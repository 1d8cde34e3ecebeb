"""Schedule names → generators, and how a model's layers map onto stages and ranks."""

from __future__ import annotations

from collections.abc import Callable

from .blocks import v_half, v_min
from .generators import gpipe, interleaved_1f1b, one_f_one_b, zb_h1, zb_h2, zb_v
from .ir import Schedule, loop_placement, v_placement

# name -> (generator(p, m, v), natural v, fixed v?)
_GENERATORS: dict[str, tuple[Callable[[int, int, int], Schedule], int, bool]] = {
    "gpipe": (lambda p, m, v: gpipe(p, m), 1, True),
    "1f1b": (lambda p, m, v: one_f_one_b(p, m), 1, True),
    "interleaved": (lambda p, m, v: interleaved_1f1b(p, m, v), 2, False),
    "zb-h1": (lambda p, m, v: zb_h1(p, m), 1, True),
    "zb-h2": (lambda p, m, v: zb_h2(p, m), 1, True),
    "zb-v": (lambda p, m, v: zb_v(p, m), 2, True),
    "v-half": (lambda p, m, v: v_half(p, m), 2, True),
    "v-min": (lambda p, m, v: v_min(p, m), 2, True),
}
SCHEDULE_NAMES: tuple[str, ...] = tuple(_GENERATORS)


def canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "zbh2": "zb-h2", "zbv": "zb-v", "vhalf": "v-half", "vmin": "v-min",
           "interleaved-1f1b": "interleaved", "1f1b-interleaved": "interleaved"}.get(key, key)
    if key not in _GENERATORS:
        raise ValueError(f"schedule={name!r} is not one of {', '.join(SCHEDULE_NAMES)}")
    return key


def natural_chunks(name: str) -> int:
    return _GENERATORS[canonical(name)][1]


def make_schedule(name: str, p: int, m: int, v: int | None = None) -> Schedule:
    """Build schedule ``name`` for p ranks and m microbatches (v chunks per rank where it varies)."""
    key = canonical(name)
    gen, natural, fixed = _GENERATORS[key]
    v = natural if v is None else v
    if fixed and v != natural:
        raise ValueError(f"chunks={v} does not fit schedule {key!r}, which uses {natural} chunk(s) per rank")
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"p={p}, m={m}, v={v} must all be >= 1")
    return gen(p, m, v)


def placement_for(name: str, p: int, v: int | None = None) -> list[list[int]]:
    key = canonical(name)
    v = natural_chunks(key) if v is None else v
    return v_placement(p) if key in ("zb-v", "v-half", "v-min") else loop_placement(p, v)


def even_layers(n_layer: int, n_stages: int) -> list[int]:
    """Split n_layer blocks into n_stages counts, the remainder going to the middle stages (the
    first stage also holds the embedding and the last the head)."""
    base, extra = divmod(n_layer, n_stages)
    order = sorted(range(n_stages), key=lambda s: (abs(s - (n_stages - 1) / 2), s))
    counts = [base] * n_stages
    for s in order[:extra]:
        counts[s] += 1
    return counts


def stage_layout(name: str, p: int, n_layer: int, v: int | None = None,
                 layers_per_stage: list[int] | None = None) -> list[list[tuple[int, int]]]:
    """For each rank, the (global stage index, number of blocks) it owns, in chunk order.

    Stage s holds blocks sum(layers[:s]) .. sum(layers[:s+1])-1; stage 0 also holds the
    embedding, stage p·v-1 the head. Split a GPT with
    ``split_into_stages(model, [n for each stage in global order])`` and give rank r the stages
    listed here.
    """
    placement = placement_for(name, p, v)
    n_stages = p * len(placement[0])
    layers = list(layers_per_stage) if layers_per_stage else even_layers(n_layer, n_stages)
    if len(layers) != n_stages or sum(layers) != n_layer or min(layers) < 0:
        raise ValueError(
            f"layers_per_stage={layers} must have {n_stages} non-negative entries summing to n_layer={n_layer}")
    return [[(s, layers[s]) for s in stages] for stages in placement]
