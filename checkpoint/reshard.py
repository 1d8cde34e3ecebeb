"""Restore onto a different world size.

Two layouts are supported:

* **Data-parallel replicas** (every rank holds the same full state): new rank r reads old rank
  ``r % old_world``; any replica is as good as any other.
* **ZeRO-style flat shards** (rank r holds elements ``[r*S, (r+1)*S)`` of one flat vector of
  ``numel`` elements, the last shard zero-padded so every shard has ``S = ceil(numel/world)``):
  the old shards are concatenated in rank order, cut to ``numel``, and re-split for the new world.
"""

from __future__ import annotations

import torch


def dp_source_rank(new_rank: int, old_world: int) -> int:
    """Which old replica a new data-parallel rank restores from."""
    if old_world <= 0:
        raise ValueError(f"old_world={old_world} must be > 0")
    return new_rank % old_world


def shard_size(numel: int, world: int) -> int:
    return -(-numel // world)


def flat_shard(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's zero-padded shard of a flat vector (the ZeRO convention above)."""
    size = shard_size(flat.numel(), world)
    out = torch.zeros(size, dtype=flat.dtype)
    piece = flat[rank * size : (rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def reshard_flat(shards: list[torch.Tensor], numel: int, new_world: int) -> list[torch.Tensor]:
    """Old flat shards (rank order) → the new world's shards of the same ``numel``-element vector."""
    if not shards:
        raise ValueError("no shards to reshard")
    old = shard_size(numel, len(shards))
    bad = [i for i, s in enumerate(shards) if s.numel() != old]
    if bad:
        raise ValueError(f"shards {bad} have the wrong size: expected {old} elements each for numel={numel} "
                         f"over {len(shards)} ranks")
    flat = torch.cat([s.reshape(-1) for s in shards])[:numel]
    return [flat_shard(flat, r, new_world) for r in range(new_world)]


def reshard_states(
    states: dict[int, dict[str, torch.Tensor]],
    new_world: int,
    flat_numel: dict[str, int] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Per-rank tensor dicts of an old world → the new world's.

    Tensors named in ``flat_numel`` (name → full numel) are flat shards and are re-split;
    all others are data-parallel replicas taken from ``dp_source_rank``.
    """
    old_world = len(states)
    if sorted(states) != list(range(old_world)):
        raise ValueError(f"need every old rank 0..{old_world - 1}, got {sorted(states)}")
    flat_numel = flat_numel or {}
    out: dict[int, dict[str, torch.Tensor]] = {}
    resharded = {name: reshard_flat([states[r][name] for r in range(old_world)], n, new_world)
                 for name, n in flat_numel.items()}
    for r in range(new_world):
        src = states[dp_source_rank(r, old_world)]
        out[r] = {name: (resharded[name][r] if name in resharded else t) for name, t in src.items()}
    return out
