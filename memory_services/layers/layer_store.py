"""Versioned product-key layers: one base file plus row-sparse deltas, committed by the memory store.

A served layer has a *chain*, kept in the memory store's key-value table under
``layer.<job>`` (so it commits in the same transaction as the consolidation that wrote it)::

    {"version": 7, "base": "base-000005-1a2b.safetensors", "base_version": 5,
     "deltas": [[6, "delta-000006-3c4d.safetensors"], [7, "delta-000007-5e6f.safetensors"]]}

The base holds every tensor of the layer (query, sub-keys, values, gate, output) with its config
and origin (a fresh layer, or block L of a run at step S) in the safetensors metadata. A delta
holds the value rows one version changed (``rows``, ``values``) and the (key, source id) pairs
distillation trained on (``keys``), so the next distillation can replay them. Files are written
atomically under fresh names; only the chain the store committed names them, and ``gc`` removes
the rest. After ``FOLD_AFTER`` deltas a new base is written; the newest delta stays listed so
replicas one version behind still advance by rows.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..config import ProductKeyConfig
from ..store import atomic_write_bytes
from .product_key import ProductKeyMemory

FOLD_AFTER = 8


@dataclass
class LayerChain:
    version: int
    base: str
    base_version: int
    deltas: list[tuple[int, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "base": self.base, "base_version": self.base_version,
                           "deltas": [list(d) for d in self.deltas]})

    @staticmethod
    def from_json(text: str) -> "LayerChain":
        raw = json.loads(text)
        return LayerChain(int(raw["version"]), raw["base"], int(raw["base_version"]),
                          [(int(v), f) for v, f in raw["deltas"]])

    def files(self) -> set[str]:
        return {self.base, *(f for _, f in self.deltas)}

    def rebuild(self) -> list[tuple[int, str]]:
        """Deltas applied on top of the base."""
        return [(v, f) for v, f in self.deltas if v > self.base_version]

    def steps_after(self, version: int) -> list[tuple[int, str]] | None:
        """Deltas that take a replica at ``version`` to this chain's version; None if some are gone."""
        if version == self.version:
            return []
        steps = [(v, f) for v, f in self.deltas if v > version]
        return steps if [v for v, _ in steps] == list(range(version + 1, self.version + 1)) else None


@dataclass
class Delta:
    version: int
    rows: torch.Tensor
    values: torch.Tensor


def chain_key(job: str) -> str:
    return f"layer.{job}"


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


class LayerStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _name(self, kind: str, version: int) -> str:
        return f"{kind}-{version:06d}-{uuid.uuid4().hex[:8]}.safetensors"

    # -- writing ------------------------------------------------------------------------------
    def write_base(self, layer: ProductKeyMemory, version: int, origin: dict[str, Any],
                   keys: torch.Tensor | None = None, sources: list[str] | None = None) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in layer.state_dict().items()}
        if keys is not None and len(keys):
            tensors["distill.keys"] = keys.float().contiguous()
        meta = {"config": json.dumps(asdict(layer.cfg)), "origin": json.dumps(origin), "version": str(version),
                "sources": json.dumps(sources or [])}
        name = self._name("base", version)
        atomic_write_bytes(self.dir / name, save(tensors, metadata=meta))
        return name

    def write_delta(self, version: int, rows: torch.Tensor, values: torch.Tensor, keys: torch.Tensor,
                    sources: list[str]) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {"rows": rows.to(torch.int64).contiguous(), "values": values.detach().float().contiguous(),
                   "keys": keys.float().reshape(len(sources), -1).contiguous()}
        name = self._name("delta", version)
        meta = {"version": str(version), "sources": json.dumps(sources)}
        atomic_write_bytes(self.dir / name, save(tensors, metadata=meta))
        return name

    def gc(self, chain: LayerChain | None) -> list[str]:
        """Remove layer files the committed chain does not name (crashed attempts, folded deltas)."""
        keep = chain.files() if chain else set()
        removed = []
        for path in self.dir.glob("*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    # -- reading ------------------------------------------------------------------------------
    def config(self, chain: LayerChain) -> tuple[ProductKeyConfig, dict[str, Any]]:
        meta = _meta(self.dir / chain.base)
        if "config" not in meta:
            raise ValueError(f"{self.dir / chain.base}: not a trainmem layer base (no config in its metadata)")
        return ProductKeyConfig(**json.loads(meta["config"])), json.loads(meta.get("origin", "{}"))

    def read_delta(self, version: int, name: str) -> Delta:
        t = load_file(str(self.dir / name))
        return Delta(version, t["rows"], t["values"])

    def load_layer(self, chain: LayerChain) -> ProductKeyMemory:
        """The whole layer at ``chain.version``."""
        cfg, _ = self.config(chain)
        tensors = load_file(str(self.dir / chain.base))
        layer = ProductKeyMemory(cfg)
        layer.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("distill.")})
        with torch.no_grad():
            for version, name in chain.rebuild():
                d = self.read_delta(version, name)
                layer.values.weight.index_copy_(0, d.rows, d.values)
        return layer

    def load_router(self, chain: LayerChain) -> ProductKeyMemory:
        """The layer without its value table (a 1-row placeholder): what a router replica holds."""
        cfg, _ = self.config(chain)
        with torch.device("meta"):  # no n_slots x v allocation for a table this replica never holds
            layer = ProductKeyMemory(cfg)
        with safe_open(str(self.dir / chain.base), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k != "values.weight" and not k.startswith("distill.")}
        state["values.weight"] = torch.zeros(0, cfg.value_dim)
        layer.values.weight = torch.nn.Parameter(state["values.weight"], requires_grad=False)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.requires_grad_(False)

    def load_values(self, chain: LayerChain, rows: tuple[int, int] | None = None,
                    cols: tuple[int, int] | None = None) -> torch.Tensor:
        """A slice of the value table at ``chain.version``: only that slice is read from the base."""
        with safe_open(str(self.dir / chain.base), framework="pt") as f:
            sl = f.get_slice("values.weight")
            n, v = sl.get_shape()
            r0, r1 = rows or (0, n)
            c0, c1 = cols or (0, v)
            table = sl[r0:r1, c0:c1].clone()
        for version, name in chain.rebuild():
            apply_delta(table, self.read_delta(version, name), (r0, r1), (c0, c1))
        return table

    def pairs(self, chain: LayerChain) -> tuple[torch.Tensor, list[str]]:
        """Every (key, source id) pair distillation trained on in this chain (the newest key per source)."""
        found: dict[str, torch.Tensor] = {}
        base = self.dir / chain.base
        meta = _meta(base)
        sources = json.loads(meta.get("sources", "[]"))
        if sources:
            with safe_open(str(base), framework="pt") as f:
                keys = f.get_tensor("distill.keys")
            found.update(zip(sources, keys))
        for _, name in chain.rebuild():
            t = load_file(str(self.dir / name))
            found.update(zip(json.loads(_meta(self.dir / name)["sources"]), t["keys"]))
        if not found:
            return torch.zeros(0, 0), []
        ids = list(found)
        return torch.stack([found[i] for i in ids]), ids


def apply_delta(table: torch.Tensor, delta: Delta, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """Write the delta's rows that fall in this slice; returns (local row ids, their old values) for undo."""
    r0, r1 = rows
    keep = (delta.rows >= r0) & (delta.rows < r1)
    local = delta.rows[keep] - r0
    old = table.index_select(0, local)
    table.index_copy_(0, local, delta.values[keep][:, cols[0] : cols[1]].to(table.dtype))
    return local, old
