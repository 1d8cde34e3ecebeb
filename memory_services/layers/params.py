"""Which parameters of a model are memory rows, and the optimizers that train them.

Memory layers (product-key values, n-gram tables) expose ``value_parameters()``, ``value_lr``
and ``sparse_values``; their rows get their own optimizer (row-sparse Adam for sparse rows),
everything else AdamW.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .engram import HashedNgramMemory
from .optim import RowSparseAdam
from .product_key import ProductKeyMemory

MEMORY_LAYERS = (ProductKeyMemory, HashedNgramMemory)


def memory_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MEMORY_LAYERS)]


def memory_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s parameters into (dense, memory rows) for two optimizers."""
    values = [p for m in memory_layers(model) for p in m.value_parameters()]
    ids = {id(p) for p in values}
    return [p for p in model.parameters() if id(p) not in ids], values


def value_optimizer(params: Iterable[nn.Parameter], lr: float = 1e-3, sparse: bool = True) -> torch.optim.Optimizer:
    """The memory rows' own optimizer: row-sparse Adam (sparse) or torch's fused Adam (dense)."""
    params = list(params)
    if sparse:
        return RowSparseAdam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, fused=True)


def build_optimizers(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    """AdamW over dense parameters plus one optimizer per memory layer, at that layer's learning rate."""
    dense, _ = memory_parameters(model)
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay)]
    for m in memory_layers(model):
        opts.append(value_optimizer(m.value_parameters(), m.value_lr, m.sparse_values))
    return opts
