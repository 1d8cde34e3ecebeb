"""Where a (re)started job restores from: every tier's candidates, newest step first, then walked.

The driver lists candidates over all tiers (:func:`disk_candidates`, plus the in-memory steps the
snapshot coordinator verified) and orders them newest step first, the fastest tier first for
equal steps (:func:`ordered`). Each rank opens a candidate with :func:`open_reader`; the ranks
then agree collectively whether every one of them could read it, and walk on to the next
candidate if any could not (the worker does the walk; this module only reads). A reader verifies
what it reads (sha256 for durable files, both checksums for flushed snapshots, xxh3 per fragment
in memory) and raises :class:`CheckpointCorrupt` / :class:`SnapshotUnavailable` naming the file,
fragment and step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .durable import CheckpointCorrupt, DurableStore
from .flush import FlushStore
from .storage import Location, as_location

TIERS = ("memory", "flush", "durable")  # fastest first
FLUSH_SUBDIR = "snapshots"
StateReader = Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Any]]]
Where = str | Path | Location


@dataclass
class Candidate:
    tier: str
    """memory | flush | durable."""
    step: int
    world: int
    """World size of the job that wrote it."""
    layout: str = "shared"
    """durable: 'shared' (one store, replicas) or 'per-rank' (rank-<r>/ stores)."""
    sources: dict[str, int] = field(default_factory=dict)
    """memory: {old rank: rank whose snapshot stands in for it} for ranks without their own."""
    usable: list[int] = field(default_factory=list)
    """memory: ranks with >= k verified fragments."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Candidate":
        return Candidate(**d)

    def describe(self) -> str:
        return f"{self.tier} step {self.step}"


def ordered(candidates: list[Candidate]) -> list[Candidate]:
    """Newest step first; for one step, memory before flush before durable."""
    return sorted(candidates, key=lambda c: (-c.step, TIERS.index(c.tier)))


def durable_stores(checkpoint: Where) -> tuple[str, dict[int, DurableStore]]:
    """('per-rank', {rank: store}) when rank-<r>/ stores exist, else ('shared', {0: the root store})."""
    location = as_location(checkpoint)
    per_rank = {int(name[5:]): DurableStore(location.child(name)) for name in location.names()
                if name.startswith("rank-") and name[5:].isdigit()}
    return ("per-rank", per_rank) if per_rank else ("shared", {0: DurableStore(location)})


def _manifest_world(store: DurableStore, step: int) -> int | None:
    try:
        return int(store.read_manifest(step).get("meta", {})["world"])
    except (OSError, ValueError, KeyError, TypeError, CheckpointCorrupt):
        return None  # unreadable: let the rank's verified read reject it with the file named


def _flush_store(location: Location) -> FlushStore | None:
    """The flush tier lives only in a local (or shared-mount) folder."""
    return FlushStore(location.local / FLUSH_SUBDIR) if location.local is not None else None


def disk_candidates(checkpoint: Where, world: int) -> list[Candidate]:
    """Durable steps every saving rank has, and flushed snapshots, as candidates (unverified)."""
    location = as_location(checkpoint)
    out: list[Candidate] = []
    layout, stores = durable_stores(location)
    steps = set.intersection(*(set(s.steps()) for s in stores.values())) if stores else set()
    for step in steps:
        any_store = next(iter(stores.values()))
        out.append(Candidate("durable", step, _manifest_world(any_store, step) or world, layout))
    flush = _flush_store(location)
    for step in flush.steps() if flush is not None else []:
        try:
            saved_world = flush.load_manifest_world(step)
        except (OSError, ValueError, KeyError, CheckpointCorrupt):
            saved_world = world
        out.append(Candidate("flush", step, saved_world))
    return ordered(out)


def existing_state(checkpoint: Where) -> list[str]:
    """What a fresh launch would clobber: any tier's step markers or step folders, as readable names."""
    location = as_location(checkpoint)
    found = []
    layout, stores = durable_stores(location)
    for rank, store in stores.items():
        if store.steps() or store.latest_step() is not None:
            found.append(f"durable checkpoints in {store.location.uri}")
    flush = _flush_store(location)
    if flush is not None and (flush.steps() or (flush.root / "SNAPSHOT-LATEST").exists()):
        found.append(f"flushed snapshots in {flush.root}")
    return found


def durable_reader(checkpoint: Where, cand: Candidate) -> StateReader:
    """read(r): the verified durable state of old rank r's store (the shared store for replicas)."""
    location = as_location(checkpoint)

    def read(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        root = location.child(f"rank-{rank}") if cand.layout == "per-rank" else location
        loaded = DurableStore(root).load(cand.step)
        if loaded is None:
            raise CheckpointCorrupt(f"{root.uri}: no step {cand.step}")
        return loaded.tensors, loaded.meta["state"]

    return read


def flush_reader(checkpoint: Where, cand: Candidate) -> StateReader:
    """read(r): old rank r's flushed snapshot, both checksums verified."""
    from .layout import unpack

    store = _flush_store(as_location(checkpoint))
    if store is None:
        raise CheckpointCorrupt(f"flush step {cand.step}: the flush tier is local only, checkpoints are on S3")

    def load(rank: int):
        snap = store.load(cand.step, ranks=[rank])
        if snap is None or rank not in snap.ranks:
            raise CheckpointCorrupt(f"{store.root}: flushed step {cand.step} has no rank {rank}")
        r = snap.ranks[rank]
        return unpack(r.buffer, r.layout, copy=False), r.meta["user"]

    def read(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, user = load(rank)
        if user.get("striped"):  # one stripe of a replica group's state: assemble the group's
            for other in user["group"]:
                if other != rank:
                    tensors = {**tensors, **load(other)[0]}
        return tensors, user["state"]

    return read
