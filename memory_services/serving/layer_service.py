"""The served memory layer: a router replica and N value-shard deployments, versioned.

The router holds the query network, sub-keys, gate and output projection (no value table). Per
batch of lookups it computes the top-k slots and weights once, sends each shard ONE call with
the part that shard owns (by rows: only the (token, slot) pairs in its slot range; by columns:
all pairs, it holds a slice of every row), and combines (sums partial rows, or concatenates
columns). Each shard holds only its slice of the table: ~1/N of the value bytes.

Versions: a consolidation commits layer version V (a row-sparse delta) in the memory store. The
router notices on its next batch, tells every shard to advance (a shard applies the rows of its
slice and keeps the old values of those rows for ``keep_versions`` versions), and only then asks
for V. Every call names the version, so a lookup is computed from one version on every shard
(the answer says which); a shard that cannot serve it answers "gone" and the router retries at
its newest. A shard that is dead or slow (``shard_timeout_s``) makes the lookup fail with a
retryable "unavailable" error, never a partial answer.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ray import serve

from ..config import ServicesConfig
from ..layers.layer_store import LayerChain, LayerStore, apply_delta, chain_key
from ..store import MemoryStore
from .deployments import set_threads


def rows_in(requests: list[np.ndarray]) -> int:
    """@serve.batch's size of a batch of lookups: rows, not requests."""
    return sum(len(r) for r in requests)


def bounds(n: int, shards: int, shard: int) -> tuple[int, int]:
    """The [start, end) range of shard ``shard`` when n items split into ``shards`` near-equal parts."""
    return shard * n // shards, (shard + 1) * n // shards


def _chain(store: MemoryStore, key: str) -> LayerChain:
    raw = store.kv().get(key)
    if not raw:
        raise RuntimeError(f"the memory store {store.dir} has no layer chain {key!r} (serve_app creates it)")
    return LayerChain.from_json(raw)


class ValueShard:
    def __init__(self, cfg: ServicesConfig, shard: int):
        set_threads(cfg.memory_layer.threads, torch_ops=True)
        ml = cfg.memory_layer
        self.shard, self.shards, self.by, self.keep = shard, ml.shards, ml.shard_by, ml.keep_versions
        self.store = MemoryStore(cfg.store_path, cfg.embedding_dim)
        self.key = chain_key(cfg.consolidation.job_name)
        self.layers = LayerStore(cfg.layer_dir)
        self._lock = threading.Lock()
        self._load(_chain(self.store, self.key))

    def _load(self, chain: LayerChain) -> None:
        layer_cfg, _ = self.layers.config(chain)
        n, v = layer_cfg.n_slots, layer_cfg.value_dim
        self.rows = bounds(n, self.shards, self.shard) if self.by == "rows" else (0, n)
        self.cols = bounds(v, self.shards, self.shard) if self.by == "columns" else (0, v)
        table = self.layers.load_values(chain, self.rows, self.cols)
        with self._lock:
            self.table, self.version, self.undo = table, chain.version, {}

    def advance(self, version: int) -> int:
        """Apply committed versions up to ``version`` (idempotent); returns the version now held."""
        if version <= self.version:
            return self.version
        chain = _chain(self.store, self.key)
        steps = chain.steps_after(self.version)
        if steps is None:  # the deltas in between were folded away: reload (older versions are gone)
            self._load(chain)
            return self.version
        for v, name in steps:
            delta = self.layers.read_delta(v, name)
            with self._lock:
                self.undo[v - 1] = apply_delta(self.table, delta, self.rows, self.cols)
                self.version = v
                for old in [u for u in self.undo if u < self.version - self.keep]:
                    del self.undo[old]
        return self.version

    def _serves(self, version: int) -> bool:
        return version == self.version or all(u in self.undo for u in range(version, self.version))

    def _rows_at(self, version: int, local: torch.Tensor) -> torch.Tensor:
        vals = self.table.index_select(0, local)
        for u in range(self.version - 1, version - 1, -1):  # newest first: the oldest change after `version` wins
            rows, old = self.undo[u]
            if len(rows) == 0:
                continue
            pos = torch.searchsorted(rows, local).clamp(max=len(rows) - 1)
            hit = rows[pos] == local
            vals[hit] = old[pos[hit]]
        return vals

    def bag(self, version: int, payload: dict[str, np.ndarray]) -> dict[str, Any]:
        """Weighted sums of this shard's rows at ``version``; {"gone": ...} if it cannot serve that version."""
        if version > self.version:
            self.advance(version)
        with self._lock:
            if not self._serves(version):
                return {"gone": True, "have": self.version}
            current = version == self.version
            if self.by == "rows":
                local = torch.from_numpy(payload["local"]).long()
                w = torch.from_numpy(payload["w"])
                counts = torch.from_numpy(payload["counts"]).long()  # this shard's pairs per token, in token order
                if current:
                    offsets = torch.zeros(len(counts), dtype=torch.long)
                    offsets[1:] = counts.cumsum(0)[:-1]
                    out = F.embedding_bag(local, self.table, offsets, per_sample_weights=w.to(self.table.dtype),
                                          mode="sum")
                else:
                    tok = torch.repeat_interleave(torch.arange(len(counts)), counts)
                    vals = self._rows_at(version, local)
                    out = torch.zeros(len(counts), self.table.shape[1], dtype=self.table.dtype).index_add_(
                        0, tok, vals * w[:, None].to(vals.dtype))
            else:
                idx = torch.from_numpy(payload["idx"]).long()
                w = torch.from_numpy(payload["w"])
                if current:
                    out = F.embedding_bag(idx, self.table, per_sample_weights=w.to(self.table.dtype), mode="sum")
                else:
                    vals = self._rows_at(version, idx.reshape(-1)).view(*idx.shape, -1)
                    out = (vals * w[..., None].to(vals.dtype)).sum(1)
        return {"version": version, "out": out.numpy()}

    def info(self) -> dict[str, Any]:
        return {"shard": self.shard, "rows": list(self.rows), "cols": list(self.cols), "version": self.version,
                "value_bytes": self.table.numel() * self.table.element_size(), "oldest": min(self.undo, default=self.version),
                "pid": os.getpid()}


class LayerRouter:
    def __init__(self, cfg: ServicesConfig, *shards):
        self.threads = set_threads(cfg.memory_layer.threads, torch_ops=True)
        ml = cfg.memory_layer
        self.shards, self.by, self.timeout_s = list(shards), ml.shard_by, ml.shard_timeout_s
        self.store = MemoryStore(cfg.store_path, cfg.embedding_dim)
        self.key = chain_key(cfg.consolidation.job_name)
        layers = LayerStore(cfg.layer_dir)
        chain = _chain(self.store, self.key)
        self.layer = layers.load_router(chain)
        self.version = chain.version
        n = self.layer.cfg.n_slots
        self.row_bounds = [bounds(n, len(self.shards), s) for s in range(len(self.shards))]
        self.lookup.set_max_batch_size(ml.max_batch_size)
        self.lookup.set_batch_wait_timeout_s(ml.batch_wait_timeout_s)
        self._advance_lock = asyncio.Lock()

    async def _call(self, calls) -> list[Any]:
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"a value shard did not answer within {self.timeout_s}s (replica restarting?)") from None
        except Exception as e:  # a dead replica (ActorDiedError, RayActorError, ...)
            raise Unavailable(f"a value shard failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    async def _advance(self) -> None:
        raw = self.store.kv().get(self.key)
        newest = LayerChain.from_json(raw).version if raw else self.version
        if newest <= self.version:
            return
        async with self._advance_lock:
            if newest > self.version:
                await self._call([s.advance.remote(newest) for s in self.shards])
                self.version = newest  # every shard holds it now: lookups may ask for it

    def _payloads(self, weights: torch.Tensor, idx: torch.Tensor) -> list[dict[str, np.ndarray]]:
        """8 bytes per (token, slot) pair: int32 slot, float32 weight (+ int32 pair counts per token by rows)."""
        if self.by == "columns":
            p = {"idx": idx.to(torch.int32).numpy(), "w": weights.numpy()}
            return [p] * len(self.shards)
        if len(self.shards) == 1:
            return [{"local": idx.reshape(-1).to(torch.int32).numpy(), "w": weights.reshape(-1).numpy(),
                     "counts": np.full(idx.shape[0], idx.shape[1], np.int32)}]
        out = []
        for r0, r1 in self.row_bounds:
            sel = (idx >= r0) & (idx < r1)  # row-major: the selected pairs stay in token order
            out.append({"local": (idx[sel] - r0).to(torch.int32).numpy(), "w": weights[sel].numpy(),
                        "counts": sel.sum(1).to(torch.int32).numpy()})
        return out

    async def _read(self, weights: torch.Tensor, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
        payloads = self._payloads(weights, idx)
        for _ in range(3):
            version = self.version
            answers = await self._call([s.bag.remote(version, p) for s, p in zip(self.shards, payloads)])
            if any(a.get("gone") for a in answers):  # a shard restarted past this version: move on
                await self._advance()
                continue
            parts = [torch.from_numpy(a["out"]) for a in answers]
            read = torch.cat(parts, dim=1) if self.by == "columns" else torch.stack(parts).sum(0)
            return version, read
        raise Unavailable("the layer version kept changing under this lookup; retry")

    # Two batches in flight: one computes its top-k here while the shards read the other's values.
    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, max_concurrent_batches=2, batch_size_fn=rows_in)
    async def lookup(self, requests: list[np.ndarray]) -> list[dict[str, Any]]:
        """Many requests' vectors through one top-k pass and one call per shard, split back per request."""
        sizes = [len(r) for r in requests]
        x = torch.from_numpy(np.concatenate(requests).astype(np.float32, copy=False))
        try:
            await self._advance()
            with torch.no_grad():
                weights, idx = await asyncio.to_thread(self.layer.lookup, x)
                version, read = await self._read(weights, idx)
                out = self.layer.finish(x, read.to(x.dtype)).numpy()
        except Unavailable as e:
            return [{"unavailable": str(e)}] * len(requests)
        return [{"version": version, "out": part} for part in np.split(out, np.cumsum(sizes)[:-1])]

    async def shard_info(self) -> list[dict[str, Any]]:
        return await self._call([s.info.remote() for s in self.shards])

    def info(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"version": self.version, "config": asdict(self.layer.cfg), "shards": len(self.shards),
                "shard_by": self.by, "threads": self.threads}


class Unavailable(RuntimeError):
    """A shard is dead or slow: retry (the HTTP API answers 503 with Retry-After)."""
