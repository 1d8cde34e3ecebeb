"""Ray Serve backends: retriever (search/add/delete), memory-layer lookup (batched), consolidation cron.

Each backend is a plain class wrapped by ``serve.deployment`` in ``serve.py``; all of them read
and write the same Parquet memory store, which is the source of truth: the retriever replays
store rows past its watermark before answering, so writes by the consolidation job show up.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch
from ray import serve

from .config import ServicesConfig
from .consolidation import ConsolidationJob, CronScheduler
from .distill import load_layer, new_layer
from .embedder import normalize
from .retriever import Retriever
from .store import MemoryStore


def _store(cfg: ServicesConfig) -> MemoryStore:
    return MemoryStore(cfg.store_path, cfg.embedding_dim)


class RetrieverBackend:
    def __init__(self, cfg: ServicesConfig):
        self.cfg = cfg
        self.store = _store(cfg)
        self.retriever = Retriever(cfg.embedding_dim, cfg.retriever)
        self._lock = threading.Lock()
        self._seen_seq = -1
        self._sync()

    def _sync(self) -> None:
        # Cheap when nothing changed: one stat of the store file under its lock.
        seq = self.store.stats()["seq"] if self._seen_seq < 0 else self.store.current_seq()
        if seq != self._seen_seq:
            self.retriever.apply_rows(self.store.scan(self.retriever.watermark))
            self._seen_seq = seq

    def search(self, queries: np.ndarray, k: int, where: dict[str, Any] | None) -> list[list[tuple[str, float]]]:
        with self._lock:
            self._sync()
            return self.retriever.search(queries, k, where)

    def search_texts(self, texts: list[str], k: int, where: dict[str, Any] | None) -> list[list[tuple[str, float]]]:
        vecs = self.retriever.encode(texts)
        return self.search(vecs, k, where)

    def add(self, entries: list[dict[str, Any]]) -> list[str]:
        missing = [i for i, e in enumerate(entries) if e.get("embedding") is None]
        vecs = [e.get("embedding") for e in entries]
        if missing:
            encoded = self.retriever.encode([entries[i]["text"] for i in missing])
            for i, v in zip(missing, encoded):
                vecs[i] = v
        with self._lock:
            added = self.store.add(
                [e["text"] for e in entries],
                normalize(np.asarray(vecs, dtype=np.float32)),
                [e.get("metadata") or {} for e in entries],
                [e["id"] for e in entries] if all(e.get("id") for e in entries) else None,
            )
            self._sync()
        return [a.id for a in added]

    def delete(self, ids: list[str]) -> int:
        with self._lock:
            self._sync()
            live = [i for i in ids if (e := self.store.get(i)) is not None and not e.deleted]
            if live:
                self.store.delete(live)
            self._sync()
            return len(live)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._sync()
            return {**self.store.stats(), "indexed": len(self.retriever)}


class LayerBackend:
    """Product-key lookups; follows the layer version the consolidation job last committed."""

    def __init__(self, cfg: ServicesConfig):
        self.cfg = cfg
        self.store = _store(cfg)
        self.layer_key = f"layer.{cfg.consolidation.job_name}"
        self.path = ""
        self.layer = new_layer(cfg.memory_layer.layer_config())
        self._reload()
        self.lookup.set_max_batch_size(cfg.memory_layer.max_batch_size)
        self.lookup.set_batch_wait_timeout_s(cfg.memory_layer.batch_wait_timeout_s)

    def _reload(self) -> None:
        path = self.store.kv().get(self.layer_key, "")
        if path and path != self.path:
            self.layer = load_layer(path)
            self.path = path

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def lookup(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Many requests' vectors through one forward pass, split back per request."""
        self._reload()
        sizes = [len(r) for r in requests]
        x = torch.from_numpy(np.concatenate(requests).astype(np.float32))
        with torch.no_grad():
            out = self.layer(x).numpy()
        return list(np.split(out, np.cumsum(sizes)[:-1]))

    def info(self) -> dict[str, Any]:
        return {"layer_path": self.path, "config": dataclasses.asdict(self.layer.cfg)}


class ConsolidationBackend:
    """Runs the job on its cron schedule in a thread; ``run_now`` runs it at once."""

    def __init__(self, cfg: ServicesConfig, start_schedule: bool = True):
        self.job = ConsolidationJob(_store(cfg), cfg.consolidation, layer_cfg=cfg.memory_layer.layer_config())
        self.scheduler = CronScheduler(self.job, cfg.consolidation.schedule, log=lambda m: print(m, flush=True))
        self._run_lock = threading.Lock()
        self.thread = self.scheduler.start() if start_schedule else None

    def run_now(self) -> dict[str, Any]:
        with self._run_lock:
            return dataclasses.asdict(self.job.run_once())

    def status(self) -> dict[str, Any]:
        return {
            "runs": len(self.scheduler.runs),
            "next_run": self.scheduler.next_time(),
            "last_error": self.scheduler.last_error,
        }

    def check_health(self) -> None:
        if self.thread is not None and not self.thread.is_alive() and not self.scheduler.stop_event.is_set():
            raise RuntimeError("consolidation scheduler thread died")
