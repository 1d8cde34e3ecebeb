"""A plain state dict from the chunk shards of a [placement] checkpoint (for use outside trainmem)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def state_dict_from_shards(read: Callable[[int], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                           world: int) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor, pulled from each saved rank's ``param/<chunk>`` shards through the name map."""
    metas = {}
    out: dict[str, torch.Tensor] = {}
    first = read(0)[1]
    shard = int(first["chunk_elems"]) // int(first["world"])
    if int(first["world"]) != world:
        raise ValueError(f"rank 0's checkpoint says world {first['world']}, {world} ranks were found")
    for name, (chunk, offset, numel, shape) in first["params"].items():
        r = offset // shard
        if r not in metas:
            metas[r] = read(r)
        tensors = metas[r][0]
        start = offset - r * shard
        out[name] = tensors[f"param/{chunk}"][start: start + numel].reshape(shape).clone()
    return out
