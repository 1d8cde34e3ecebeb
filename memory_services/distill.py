"""Writing consolidated entries into a product-key layer's value rows, and layer files.

Distillation trains only the value rows the consolidated keys read (sparse gradients,
row-sparse Adam): queries and sub-keys are frozen, so every other row stays bitwise unchanged.
Layer files are safetensors (no pickle) written atomically, named by version; the store's
commit names the current one, so a crash before the commit leaves only an unused file.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ProductKeyConfig
from .optim import RowSparseAdam
from .product_key import ProductKeyMemory
from .store import atomic_write_bytes


def new_layer(cfg: ProductKeyConfig, seed: int = 0) -> ProductKeyMemory:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProductKeyMemory(cfg)


def save_layer(layer: ProductKeyMemory, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
    data = st_save(state, metadata={"config": json.dumps(asdict(layer.cfg))})
    atomic_write_bytes(Path(path), data)


def load_layer(path: str | Path) -> ProductKeyMemory:
    raw = Path(path).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    if "config" not in meta:
        raise ValueError(f"{path}: not a trainmem memory-layer file (no config in its metadata)")
    layer = ProductKeyMemory(ProductKeyConfig(**json.loads(meta["config"])))
    layer.load_state_dict(st_load(raw))
    return layer


def read_rows(layer: ProductKeyMemory, keys: torch.Tensor) -> torch.Tensor:
    """Sorted unique value rows the given keys read."""
    with torch.no_grad():
        _, idx = layer.lookup(keys)
    return torch.unique(idx)


def distill(
    layer: ProductKeyMemory, keys: torch.Tensor, targets: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Fit ``layer(keys) ≈ targets`` by updating only the value rows the keys read. Returns those rows."""
    if not layer.cfg.sparse:
        raise ValueError("sparse=False: distillation needs a layer with sparse value gradients")
    keys, targets = keys.float(), targets.float()
    rows = read_rows(layer, keys)
    frozen = [p for p in layer.parameters() if p is not layer.values.weight]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    opt = RowSparseAdam([layer.values.weight], lr=lr)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(layer(keys), targets)
            loss.backward()
            opt.step()
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
