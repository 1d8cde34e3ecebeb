"""FAISS retriever over memory-store embeddings: flat / IVF / HNSW, filtered search, tombstones.

Vectors are unit length and scored by inner product (cosine). A FAISS label is the vector's
position in ``self._ids``; deletes mark the position dead (HNSW cannot remove), searches skip
dead positions through an ``IDSelectorBitmap``, and ``compact()`` rebuilds without them once
they pass ``compact_ratio``. Saved as a directory: generation-named index and entry files plus
a manifest switched atomically last; the manifest names the store (its id) and the store
``seq`` the index has applied, so a restart loads it and replays only what came after.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import RetrieverConfig
from .embedder import Embedder, MiniLMEmbedder, normalize
from .store import DEFAULT_NAMESPACE, atomic_write_bytes, compile_where, embeddings_of

Hit = tuple[str, float]


class StaleIndex(RuntimeError):
    """A saved index that cannot serve this store or config; the message says why (it is rebuilt)."""


class Retriever:
    def __init__(self, dim: int, cfg: RetrieverConfig | None = None, embed: Embedder | None = None):
        self.dim = dim
        self.cfg = cfg or RetrieverConfig()
        if embed is None and self.cfg.embedder == "minilm":
            embed = MiniLMEmbedder()
        self.embed = embed
        self._ids: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._ns: list[str] = []
        self._vecs = np.zeros((0, dim), np.float32)
        self._dead = np.zeros(0, bool)
        self._pos: dict[str, int] = {}
        self._index = self._new_index()
        self.watermark = 0
        """Highest store ``seq`` applied by ``apply_rows``."""
        self.exact_filter_max = 4096
        """A filtered search with at most this many allowed rows is answered exactly (cheaper, exact)."""

    # -- index construction -------------------------------------------------------------------
    def _new_index(self) -> faiss.Index:
        c = self.cfg
        if c.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if c.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, c.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = c.ef_construction
            return index
        quantizer = faiss.IndexFlatIP(self.dim)
        # faiss's Python wrapper keeps ``quantizer`` referenced by the index.
        return faiss.IndexIVFFlat(quantizer, self.dim, c.nlist, faiss.METRIC_INNER_PRODUCT)

    def _train_if_ready(self) -> None:
        """IVF trains once it has 39*nlist vectors (FAISS's own minimum); until then search is exact."""
        if self._index.is_trained or len(self._ids) < 39 * self.cfg.nlist:
            return
        self._index.train(self._vecs[: len(self._ids)])
        self._index.add(self._vecs[: len(self._ids)])

    def _append(self, ids: list[str], vecs: np.ndarray, metas: list[dict[str, Any]], namespaces: list[str]) -> None:
        start = len(self._ids)
        self._vecs = _grow(self._vecs, start, vecs)
        self._dead = _grow(self._dead, start, np.zeros(len(ids), bool))
        self._ids.extend(ids)
        self._meta.extend(metas)
        self._ns.extend(namespaces)
        for i, entry_id in enumerate(ids):
            self._pos[entry_id] = start + i
        if self._index.is_trained:
            self._index.add(vecs)
        else:
            self._train_if_ready()

    # -- public API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pos)

    def add(self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any]] | None = None,
            namespaces: list[str] | None = None) -> None:
        """Insert or replace entries (a replaced entry's old vector is tombstoned)."""
        vecs = normalize(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors have {vecs.shape[1]} dims, the retriever has {self.dim}")
        if len(set(ids)) != len(ids):
            raise ValueError("ids within one add must be unique")
        self.delete([i for i in ids if i in self._pos], compact=False)
        self._append(list(ids), vecs, list(metadata or [{} for _ in ids]),
                     list(namespaces or [DEFAULT_NAMESPACE] * len(ids)))

    def add_texts(self, ids: list[str], texts: list[str], metadata: list[dict[str, Any]] | None = None) -> np.ndarray:
        vecs = self.encode(texts)
        self.add(ids, vecs, metadata)
        return vecs

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.embed is None:
            raise ValueError("this retriever has no embedder (retriever.embedder='none'): pass embeddings")
        return normalize(self.embed(list(texts)))

    def delete(self, ids: list[str], compact: bool = True) -> int:
        """Tombstone entries; unknown ids are ignored. Returns how many were live."""
        n = 0
        for entry_id in ids:
            pos = self._pos.pop(entry_id, None)
            if pos is not None:
                self._dead[pos] = True
                n += 1
        if compact and len(self._ids) and self._dead.sum() > self.cfg.compact_ratio * len(self._ids):
            self.compact()
        return n

    def compact(self) -> None:
        """Rebuild the index from live vectors only (the way to really delete from HNSW)."""
        live = np.flatnonzero(~self._dead[: len(self._ids)])
        ids = [self._ids[i] for i in live]
        metas = [self._meta[i] for i in live]
        namespaces = [self._ns[i] for i in live]
        vecs = self._vecs[live]
        self._ids, self._meta, self._ns, self._pos = [], [], [], {}
        self._vecs, self._dead = np.zeros((0, self.dim), np.float32), np.zeros(0, bool)
        self._index = self._new_index()
        self._append(ids, vecs, metas, namespaces)

    def _allowed(self, where: dict[str, Any] | None, namespace: str | list[str] | None) -> np.ndarray:
        n = len(self._ids)
        allowed = ~self._dead[:n]
        if namespace is not None:
            names = {namespace} if isinstance(namespace, str) else set(namespace)
            allowed &= np.fromiter((ns in names for ns in self._ns), bool, n)
        pred = compile_where(where)
        if pred is not None:
            live = np.flatnonzero(allowed)
            allowed[live] = np.fromiter((pred(self._meta[p]) for p in live), bool, len(live))
        return allowed

    def search(
        self, queries: np.ndarray, k: int = 10, where: dict[str, Any] | None = None,
        namespace: str | list[str] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` live entries per query; ``where`` filters on metadata (see store.filters), ``namespace`` on namespaces."""
        q = normalize(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        filtered = bool(where) or namespace is not None
        allowed = self._allowed(where, namespace)
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            return [[] for _ in range(len(q))]
        k_eff = min(k, n_allowed)
        if not self._index.is_trained or (filtered and n_allowed <= self.exact_filter_max):
            scores, labels = self._exact(q, k_eff, allowed)
        else:
            scores, labels = self._faiss(q, k_eff, allowed)
            if (labels < 0).any():  # a strict filter starved the graph walk: answer exactly
                scores, labels = self._exact(q, k_eff, allowed)
        return [
            [(self._ids[lab], float(s)) for s, lab in zip(srow, lrow) if lab >= 0]
            for srow, lrow in zip(scores, labels)
        ]


    def _faiss(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # ``bitmap`` and ``sel`` are locals so they outlive the search that reads their raw pointers.
        bitmap = sel = None
        if not allowed.all():
            bitmap = np.packbits(allowed, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        params = self._search_params(sel)
        scores, labels = self._index.search(q, k, params=params)
        del bitmap, sel
        return scores, labels

    def _search_params(self, sel) -> faiss.SearchParameters:
        if self.cfg.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.cfg.ef_search, 1)
        elif self.cfg.kind == "ivf":
            p = faiss.SearchParametersIVF()
            p.nprobe = self.cfg.nprobe
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def _exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cand = np.flatnonzero(allowed)
        sims = q @ self._vecs[cand].T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sims, top, 1), cand[top]

    # -- store sync -------------------------------------------------------------------------
    def apply_rows(self, rows: pa.Table) -> int:
        """Apply store rows (as from ``MemoryStore.scan(self.watermark)``): upserts and tombstones."""
        if len(rows) == 0:
            return 0
        deleted = rows.column("deleted").to_pylist()
        ids = rows.column("id").to_pylist()
        metas = [json.loads(m or "{}") for m in rows.column("metadata").to_pylist()]
        namespaces = rows.column("namespace").to_pylist()
        vecs = embeddings_of(rows)
        self.delete([i for i, d in zip(ids, deleted) if d])
        keep = [j for j, d in enumerate(deleted) if not d]
        if keep:
            self.add([ids[j] for j in keep], vecs[keep], [metas[j] for j in keep], [namespaces[j] for j in keep])
        self.watermark = max(self.watermark, int(max(rows.column("seq").to_pylist())))
        return len(rows)

    # -- persistence --------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What a saved index must match to be reused: dimension and the index's build settings."""
        c = self.cfg
        return {"dim": self.dim, "kind": c.kind, "hnsw_m": c.hnsw_m, "ef_construction": c.ef_construction,
                "nlist": c.nlist}

    def save(self, directory: str | Path, store_id: str = "") -> None:
        """Index + entries under a fresh generation name, then the manifest (the switch), then old files go."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        gen = f"{time.time_ns()}-{os.getpid()}"
        n = len(self._ids)
        table = pa.table(
            {
                "id": pa.array(self._ids, pa.string()),
                "namespace": pa.array(self._ns, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(self._vecs[:n].reshape(-1)), self.dim),
                "deleted": pa.array(self._dead[:n]),
                "metadata": pa.array([json.dumps(m, sort_keys=True) for m in self._meta], pa.string()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(d / f"entries-{gen}.parquet", sink.getvalue().to_pybytes())
        atomic_write_bytes(d / f"index-{gen}.faiss", faiss.serialize_index(self._index).tobytes())
        manifest = {"generation": gen, "store_id": store_id, "watermark": self.watermark, **self.fingerprint()}
        atomic_write_bytes(d / "manifest.json", json.dumps(manifest).encode())
        for old in list(d.glob("entries-*.parquet")) + list(d.glob("index-*.faiss")):
            if gen not in old.name:
                old.unlink(missing_ok=True)

    @classmethod
    def load(
        cls, directory: str | Path, cfg: RetrieverConfig | None = None, embed: Embedder | None = None,
        store_id: str | None = None, store_seq: int | None = None,
    ) -> "Retriever":
        """A saved index; StaleIndex if it was built for another store, another config, or a newer store state."""
        d = Path(directory)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{d}: no manifest.json (fix: point at a directory written by Retriever.save)")
        cfg = cfg or RetrieverConfig(kind=manifest["kind"], embedder="none")
        self = cls(int(manifest["dim"]), cfg, embed)
        want = self.fingerprint()
        diff = [f"{k}={manifest.get(k)!r} (config: {v!r})" for k, v in want.items() if manifest.get(k) != v]
        if diff:
            raise StaleIndex(f"{d}: saved with {', '.join(diff)}")
        if store_id is not None and manifest.get("store_id") != store_id:
            raise StaleIndex(f"{d}: saved for store {manifest.get('store_id')!r}, not {store_id!r}")
        if store_seq is not None and int(manifest["watermark"]) > store_seq:
            raise StaleIndex(f"{d}: saved at store seq {manifest['watermark']}, the store is at {store_seq}")
        gen = manifest["generation"]
        table = pq.read_table(d / f"entries-{gen}.parquet")
        raw = np.frombuffer((d / f"index-{gen}.faiss").read_bytes(), dtype=np.uint8)
        self._index = faiss.deserialize_index(raw.copy())
        self._ids = table.column("id").to_pylist()
        self._ns = table.column("namespace").to_pylist()
        self._meta = [json.loads(m) for m in table.column("metadata").to_pylist()]
        col = table.column("vector").combine_chunks()
        self._vecs = col.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim).astype(np.float32)
        self._dead = np.asarray(table.column("deleted").to_pylist(), bool)
        self._pos = {i: p for p, i in enumerate(self._ids) if not self._dead[p]}
        self.watermark = int(manifest["watermark"])
        return self


def _grow(buf: np.ndarray, used: int, rows: np.ndarray) -> np.ndarray:
    """``buf[:used]`` followed by ``rows``, reallocating by doubling (appends stay amortized O(rows))."""
    need = used + len(rows)
    if need > len(buf):
        grown = np.zeros((max(need, 2 * len(buf), 1024), *buf.shape[1:]), buf.dtype)
        grown[:used] = buf[:used]
        buf = grown
    buf[used:need] = rows
    return buf
