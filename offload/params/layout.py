"""Chunks: parameters packed in first-use order into fixed-size chunks, one list per state type.

A chunk of ``chunk_elems`` fp32 elements is ``world`` equal shards; data-parallel rank r owns shard r
of every chunk (its parameters, gradients and Adam moments). A shard holds whole parameters, so
each parameter's optimizer step and gradient norm run on one rank over the whole tensor, exactly as
torch runs them, at any world size. Parameter p sits at the same offset of the param, grad, exp_avg
and exp_avg_sq lists. The size search minimises wasted elements under greedy packing in visit order
(ColossalAI Gemini's rule), over sizes that keep every parameter inside one shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ELEM = 4  # fp32 bytes
PARAM_ALIGN = 16  # elements: each parameter starts on a 64-byte boundary
SHARD_ALIGN = 1024  # elements: shards are whole 4 KiB blocks (O_DIRECT)
STATES = ("param", "grad", "exp_avg", "exp_avg_sq")


def _up(n: int, a: int) -> int:
    return -(-int(n) // a) * a


@dataclass(frozen=True)
class ParamSlot:
    index: int  # position in model.parameters()
    name: str
    shape: tuple[int, ...]
    numel: int
    chunk: int
    offset: int  # elements from the chunk's start
    owner: int  # the rank whose shard holds it

    def shard_offset(self, shard_elems: int) -> int:
        return self.offset - self.owner * shard_elems


@dataclass
class ChunkLayout:
    chunk_elems: int
    world: int
    slots: list[ParamSlot]  # in model.parameters() order
    n_chunks: int

    @property
    def shard_elems(self) -> int:
        return self.chunk_elems // self.world

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_elems * ELEM

    @property
    def shard_bytes(self) -> int:
        return self.shard_elems * ELEM

    @property
    def param_elems(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def waste_elems(self) -> int:
        return self.n_chunks * self.chunk_elems - self.param_elems

    @property
    def waste_fraction(self) -> float:
        total = self.n_chunks * self.chunk_elems
        return self.waste_elems / total if total else 0.0

    def chunk_params(self, chunk: int) -> list[ParamSlot]:
        return [s for s in self.slots if s.chunk == chunk]

    def owned(self, rank: int, chunk: int | None = None) -> list[ParamSlot]:
        return [s for s in self.slots if s.owner == rank and (chunk is None or s.chunk == chunk)]

    def by_name(self) -> dict[str, ParamSlot]:
        return {s.name: s for s in self.slots}

    def to_meta(self) -> dict:
        return {"chunk_elems": self.chunk_elems, "world": self.world, "n_chunks": self.n_chunks,
                "params": {s.name: [s.chunk, s.offset, s.numel, list(s.shape)] for s in self.slots}}


def pack(params: list[tuple[str, tuple[int, ...]]], order: list[int], shard_elems: int, world: int) -> tuple[dict, int]:
    """Greedy packing of parameters (visited in ``order``) into consecutive shards of ``shard_elems``.

    Returns ({param index: (chunk, offset, owner)}, number of chunks).
    """
    where: dict[int, tuple[int, int, int]] = {}
    shard, used = 0, 0
    for i in order:
        numel = math.prod(params[i][1]) if params[i][1] else 1
        need = _up(numel, PARAM_ALIGN)
        if need > shard_elems:
            raise ValueError(f"parameter {params[i][0]} ({numel} elements) does not fit a shard of {shard_elems}")
        if used + need > shard_elems:
            shard, used = shard + 1, 0
        chunk, owner = divmod(shard, world)
        where[i] = (chunk, owner * shard_elems + used, owner)
        used += need
    n_chunks = shard // world + 1 if where else 0
    return where, n_chunks


def build_layout(params: list[tuple[str, tuple[int, ...]]], order: list[int], chunk_elems: int, world: int) -> ChunkLayout:
    if chunk_elems % (world * SHARD_ALIGN):
        raise ValueError(f"chunk_elems={chunk_elems} must be a multiple of world x {SHARD_ALIGN}")
    where, n_chunks = pack(params, order, chunk_elems // world, world)
    slots = []
    for i, (name, shape) in enumerate(params):
        chunk, offset, owner = where[i]
        slots.append(ParamSlot(index=i, name=name, shape=tuple(shape), numel=math.prod(shape) if shape else 1,
                               chunk=chunk, offset=offset, owner=owner))
    return ChunkLayout(chunk_elems=chunk_elems, world=world, slots=slots, n_chunks=n_chunks)


def smallest_chunk_elems(params: list[tuple[str, tuple[int, ...]]], world: int) -> int:
    """The least chunk size that keeps every parameter inside one shard."""
    largest = max((_up(math.prod(s) if s else 1, PARAM_ALIGN) for _, s in params), default=PARAM_ALIGN)
    return _up(largest, SHARD_ALIGN) * world


def candidate_sizes(params: list[tuple[str, tuple[int, ...]]], world: int, high: int | None = None,
                    count: int = 128) -> list[int]:
    """Chunk sizes the search tries: ``count`` steps from the smallest legal size to ``high`` (default 4x it)."""
    low = smallest_chunk_elems(params, world)
    high = 4 * low if high is None else max(low, high)
    step = max(world * SHARD_ALIGN, _up((high - low) // count, world * SHARD_ALIGN))
    return list(range(low, high + 1, step))


def waste_elems(params: list[tuple[str, tuple[int, ...]]], order: list[int], chunk_elems: int, world: int) -> int:
    """Elements of padding greedy packing in ``order`` leaves at this chunk size."""
    _, n_chunks = pack(params, order, chunk_elems // world, world)
    return n_chunks * chunk_elems - sum(math.prod(s) if s else 1 for _, s in params)
