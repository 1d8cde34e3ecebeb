"""Writing memories into a product-key layer's value rows by gradient steps.

Distillation trains only value rows: queries, sub-keys, gate and output stay frozen, and with
``trainable`` only the listed rows may move, so every other row stays bitwise unchanged and the
change is a row-sparse delta. Pairs that must be kept (earlier memories that read the same rows)
join the batch as constraints: their loss is minimised too, through the rows that may move.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ProductKeyConfig
from .optim import RowSparseAdam
from .product_key import ProductKeyMemory


def new_layer(cfg: ProductKeyConfig, seed: int = 0) -> ProductKeyMemory:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProductKeyMemory(cfg)


def read_rows(layer: ProductKeyMemory, keys: torch.Tensor) -> torch.Tensor:
    """Sorted unique value rows the given keys read."""
    if len(keys) == 0:
        return torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        _, idx = layer.lookup(keys.float())
    return torch.unique(idx)


def _keep_rows(grad: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    grad = grad.coalesce()
    rows = grad.indices()[0]
    keep = torch.isin(rows, allowed)
    return torch.sparse_coo_tensor(rows[keep].unsqueeze(0), grad.values()[keep], grad.shape, is_coalesced=True,
                                   check_invariants=False)


def distill(
    layer: ProductKeyMemory, keys: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
    trainable: torch.Tensor | None = None, on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Fit ``layer(keys) ≈ targets`` by updating value rows only (``trainable`` ones, default: the rows
    the keys read). Returns the rows that may have changed."""
    if not layer.cfg.sparse:
        raise ValueError("sparse=False: distillation needs a layer with sparse value gradients")
    keys, targets = keys.float(), targets.float()
    rows = read_rows(layer, keys) if trainable is None else trainable
    if len(keys) == 0 or len(rows) == 0:
        return rows
    frozen = [p for p in layer.parameters() if p is not layer.values.weight]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = RowSparseAdam([layer.values.weight], lr=lr)
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(layer(keys), targets).backward()
            if trainable is not None:
                layer.values.weight.grad = _keep_rows(layer.values.weight.grad, rows)
            opt.step()
            if on_step is not None:
                on_step(step)
    finally:
        for p, w in zip(frozen, was):
            p.requires_grad_(w)
        layer.values.weight.grad = None
    return rows


def top1_accuracy(layer: ProductKeyMemory, keys: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of keys whose output is closest (cosine) to their own target among all targets."""
    with torch.no_grad():
        out = F.normalize(layer(keys.float()), dim=-1)
    sims = out @ F.normalize(targets.float(), dim=-1).T
    return (sims.argmax(dim=1) == torch.arange(len(keys))).float().mean().item()
