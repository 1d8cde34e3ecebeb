"""The retriever backend: FAISS over the store, held by each HTTP ingress replica.

The memory store is the source of truth. A retriever follows the store's log before
answering, so a write acknowledged by anyone is searchable at once. Searches share a
readers-writer lock (many at a time; only catching up with the log takes it exclusively), are
fused by ``@serve.batch`` into one FAISS call, and FAISS gets the node's CPUs (Ray pins a
``num_cpus=0`` actor to one OpenMP thread otherwise). The index is saved beside the store with
the store seq it has applied, and a restarted replica loads it and replays only what came after.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from typing import Any

import faiss
import numpy as np
from ray import serve

from ..config import ServicesConfig
from ..embedder import normalize
from ..retriever import Retriever, StaleIndex
from ..store import MemoryStore


class RWLock:
    """Many readers or one writer."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def queries_in(requests: list[tuple]) -> int:
    """@serve.batch's size of a batch of searches: query vectors, not requests."""
    return sum(len(r[0]) for r in requests)


def set_threads(requested: int, *, torch_ops: bool) -> int:
    """FAISS's OpenMP threads, and torch's where the replica runs torch ops. A retriever without an
    embedder never loads torch: an ingress replica starts ~1.5 CPU-s sooner."""
    n = requested or os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    if torch_ops:
        import torch

        torch.set_num_threads(n)
    return n


class RetrieverBackend:
    def __init__(self, cfg: ServicesConfig):
        self.cfg = cfg
        self.threads = set_threads(cfg.retriever.threads, torch_ops=cfg.retriever.embedder != "none")
        self.store = MemoryStore(cfg.store_path, cfg.embedding_dim)
        self.index_dir = cfg.store_dir / "index"
        self.lock = RWLock()
        self._sync_mutex = threading.Lock()
        self._seen_seq = -1
        self._saved_seq = -1
        self.retriever, self.index_info = self._open_index()
        self._sync()
        self.search.set_max_batch_size(cfg.retriever.max_batch_size)
        self.search.set_batch_wait_timeout_s(cfg.retriever.batch_wait_timeout_s)
        self._stop = threading.Event()
        self._saver = threading.Thread(target=self._save_loop, name="index-saver", daemon=True)
        self._saver.start()

    # -- the index and the store -----------------------------------------------------------
    def _open_index(self) -> tuple[Retriever, dict[str, Any]]:
        rcfg = self.cfg.retriever
        try:
            loaded = Retriever.load(self.index_dir, rcfg, store_id=self.store.store_id,
                                    store_seq=self.store.current_seq())
            if rcfg.embedder != "none":
                loaded.embed = Retriever(self.cfg.embedding_dim, rcfg).embed
            return loaded, {"loaded": True, "rebuilt": False, "saved_at_seq": loaded.watermark}
        except FileNotFoundError:
            reason = "no saved index"
        except StaleIndex as e:
            reason = str(e)
        return Retriever(self.cfg.embedding_dim, rcfg), {"loaded": False, "rebuilt": True, "reason": reason}

    def _sync(self) -> None:
        seq = self.store.current_seq()  # cheap when nothing changed: two stats
        if seq == self._seen_seq:
            return
        with self._sync_mutex:
            if seq == self._seen_seq:
                return
            rows = self.store.scan(self.retriever.watermark)
            with self.lock.write():
                applied = self.retriever.apply_rows(rows)
            self.index_info["replayed"] = self.index_info.get("replayed", 0) + applied
            self._seen_seq = seq

    def save_index(self) -> bool:
        """Save if anything changed since the last save and no other replica is saving."""
        if self.retriever.watermark == self._saved_seq:
            return False
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            with self.lock.read():  # no index change while it is written; searches go on
                self.retriever.save(self.index_dir, self.store.store_id)
                self._saved_seq = self.retriever.watermark
            return True
        finally:
            os.close(fd)

    def _save_loop(self) -> None:
        while not self._stop.wait(self.cfg.retriever.save_every_s):
            try:
                self.save_index()
            except Exception as e:  # a full disk must not kill searches; it is reported in stats
                self.index_info["save_error"] = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        """Stop the saver and save what changed (a graceful replica shutdown calls this)."""
        with contextlib.suppress(Exception):
            self._stop.set()
            self.save_index()

    # -- requests --------------------------------------------------------------------------
    def _search_group(self, queries: np.ndarray, k: int, where, namespace) -> list[list[tuple[str, float]]]:
        with self.lock.read():
            return self.retriever.search(queries, k, where, namespace)

    @serve.batch(max_batch_size=1024, batch_wait_timeout_s=0.001, max_concurrent_batches=2, batch_size_fn=queries_in)
    async def search(self, requests: list[tuple[np.ndarray, int, Any, Any]]) -> list[list[list[dict[str, Any]]]]:
        """Requests with the same (k, filter) are answered by one FAISS search, off the event loop."""
        await asyncio.to_thread(self._sync)
        groups: dict[str, list[int]] = {}
        for i, (_, k, where, ns) in enumerate(requests):
            groups.setdefault(repr((k, where, ns)), []).append(i)
        out: list[Any] = [None] * len(requests)
        for members in groups.values():
            _, k, where, ns = requests[members[0]]
            q = np.concatenate([requests[i][0] for i in members])
            hits = await asyncio.to_thread(self._search_group, q, k, where, ns)
            start = 0
            for i in members:
                n = len(requests[i][0])
                out[i] = self._entries(hits[start : start + n])
                start += n
        return out

    def _entries(self, rows: list[list[tuple[str, float]]]) -> list[list[dict[str, Any]]]:
        found = self.store.entries_json([h for row in rows for h, _ in row])
        return [[{**found[h], "score": s} for h, s in row if h in found] for row in rows]

    def embed(self, texts: list[str]) -> np.ndarray:
        return normalize(self.retriever.encode(texts))

    def stats(self) -> dict[str, Any]:
        self._sync()
        return {**self.store.stats(), "indexed": len(self.retriever), "index": dict(self.index_info),
                "threads": self.threads}
