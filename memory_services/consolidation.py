"""Sleep-time consolidation: merge near-duplicate memories written since a watermark.

One run: snapshot the store (live rows, write counter, this job's watermark) → entries written
since the watermark look up their neighbours through a retriever → pairs at or above
``similarity`` are joined (union-find) → each cluster becomes one consolidated entry whose
metadata lists every original id it stands for → optionally distil those entries into a
memory layer → commit. The commit is ONE store transaction: add the consolidated entries,
tombstone their members only if each member is still at the version the job read
(compare-and-swap; a cluster whose member changed meanwhile is left for the next run), and
advance the watermark. A crash before the commit changes nothing; after it, a re-run finds
nothing new. So every entry is represented exactly once, and concurrent writes survive.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import torch
from croniter import croniter

from .config import ConsolidationConfig, ProductKeyConfig, RetrieverConfig
from .distill import distill, load_layer, new_layer, save_layer
from .embedder import normalize
from .retriever import Retriever
from .store import MemoryStore, Transaction, embeddings_of

Phase = Callable[[str], None]


@dataclass
class ConsolidationResult:
    scanned: int = 0
    """Entries written since the watermark that were examined."""
    clusters: int = 0
    """Clusters merged and committed."""
    merged: int = 0
    """Entries folded into consolidated ones."""
    conflicts: int = 0
    """Clusters skipped because a member changed during the run."""
    watermark: int = 0
    consolidated_ids: list[str] = field(default_factory=list)
    layer_path: str = ""
    seconds: float = 0.0


def sources_of(entry_id: str, metadata: dict) -> list[str]:
    """The original ids an entry stands for (itself, unless it is a consolidation)."""
    return list(metadata.get("consolidated_from", [entry_id]))


def _clusters(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


class ConsolidationJob:
    def __init__(
        self,
        store: MemoryStore,
        cfg: ConsolidationConfig | None = None,
        layer_cfg: ProductKeyConfig | None = None,
        retriever_cfg: RetrieverConfig | None = None,
        on_phase: Phase | None = None,
    ):
        self.store = store
        self.cfg = cfg or ConsolidationConfig()
        self.layer_cfg = layer_cfg or ProductKeyConfig(d_model=store.dim, gated=False)
        # Exact search by default: the job's neighbour lists decide merges and must not vary.
        self.retriever_cfg = retriever_cfg or RetrieverConfig(kind="flat", embedder="none")
        self.on_phase = on_phase or (lambda _: None)
        self.layer_dir = Path(self.cfg.layer_dir) if self.cfg.layer_dir else store.path.parent / "layer"

    @property
    def watermark_key(self) -> str:
        return f"watermark.{self.cfg.job_name}"

    @property
    def layer_key(self) -> str:
        return f"layer.{self.cfg.job_name}"

    def current_layer_path(self) -> str:
        return self.store.kv().get(self.layer_key, "")

    def run_once(self) -> ConsolidationResult:
        t0 = time.perf_counter()
        with self.store.transaction() as snap:  # read-only: nothing is changed on it
            table, snap_seq, kv = snap.table, snap.seq, dict(snap.kv)
        watermark = int(kv.get(self.watermark_key, "0"))
        live = table.filter(pc.invert(table.column("deleted")))
        seqs = live.column("seq").to_numpy()
        new_rows = np.flatnonzero(seqs > watermark)
        result = ConsolidationResult(scanned=len(new_rows), watermark=watermark)
        self.on_phase(f"scan new={len(new_rows)} live={len(live)} watermark={watermark}")

        plans = self._plan(live, new_rows) if len(new_rows) else []
        self.on_phase(f"clusters {len(plans)}")
        layer_path = kv.get(self.layer_key, "")
        if plans and self.cfg.distill:
            self.on_phase("distill")
            layer_path = self._distill(plans, kv.get(self.layer_key, ""), snap_seq)
        self.on_phase("commit")
        with self.store.transaction() as txn:
            concurrent = txn.seq != snap_seq
            for plan in plans:
                if self._commit_cluster(txn, plan):
                    result.clusters += 1
                    result.merged += len(plan["members"])
                    result.consolidated_ids.append(plan["id"])
                else:
                    result.conflicts += 1
            # Writes that landed after the snapshot are past snap_seq and stay for the next run;
            # with none, everything up to our own commit is consolidated.
            result.watermark = snap_seq if concurrent else txn.seq
            txn.kv[self.watermark_key] = str(result.watermark)
            if layer_path:
                txn.kv[self.layer_key] = layer_path
        result.layer_path = layer_path
        result.seconds = time.perf_counter() - t0
        self.on_phase(f"done clusters={result.clusters} conflicts={result.conflicts}")
        return result

    def _plan(self, live, new_rows: np.ndarray) -> list[dict]:
        ids = live.column("id").to_pylist()
        vecs = normalize(embeddings_of(live))
        metas = [json.loads(m or "{}") for m in live.column("metadata").to_pylist()]
        retriever = Retriever(vecs.shape[1], self.retriever_cfg, embed=None)
        retriever.add(ids, vecs)
        pos = {i: p for p, i in enumerate(ids)}
        k = min(self.cfg.neighbours + 1, len(ids))
        pairs = []
        for start in range(0, len(new_rows), 1024):
            chunk = new_rows[start : start + 1024]
            for a, hits in zip(chunk, retriever.search(vecs[chunk], k)):
                pairs += [(int(a), pos[h]) for h, s in hits if s >= self.cfg.similarity and pos[h] != a]
        texts = live.column("text").to_pylist()
        versions = live.column("version").to_pylist()
        plans = []
        for members in _clusters(len(ids), pairs):
            members.sort(key=lambda m: ids[m])
            origin = sorted({s for m in members for s in sources_of(ids[m], metas[m])})
            mvecs = vecs[members]
            centre = normalize(mvecs.mean(axis=0, keepdims=True))[0]
            rep = members[int(np.argmax(mvecs @ centre))]
            digest = hashlib.sha1("\n".join(origin).encode()).hexdigest()[:20]
            plans.append(
                {
                    "id": f"c-{digest}",
                    "text": texts[rep],
                    "embedding": centre,
                    "members": [(ids[m], versions[m]) for m in members],
                    "metadata": {
                        "consolidated_from": origin,
                        "merged": [ids[m] for m in members],
                        "job": self.cfg.job_name,
                        "variants": sorted({texts[m] for m in members})[:16],
                    },
                }
            )
        return plans

    def _commit_cluster(self, txn: Transaction, plan: dict) -> bool:
        for entry_id, version in plan["members"]:
            cur = txn.get(entry_id)
            if cur is None or cur.deleted or cur.version != version:
                return False
        existing = txn.get(plan["id"])
        for entry_id, version in plan["members"]:
            txn.delete(entry_id, expected_version=version)
        txn.put(
            plan["id"], plan["text"], plan["embedding"], plan["metadata"],
            expected_version=-1 if existing is None else existing.version,
        )
        return True

    def _distill(self, plans: list[dict], current: str, snap_seq: int) -> str:
        layer = load_layer(current) if current and Path(current).exists() else new_layer(self.layer_cfg)
        keys = torch.from_numpy(np.stack([p["embedding"] for p in plans]))
        distill(layer, keys, keys.clone(), self.cfg.distill_steps, self.cfg.distill_lr)
        # A fresh name per attempt: a crashed attempt's file is never the committed one.
        path = self.layer_dir / f"layer-{snap_seq}-{uuid.uuid4().hex[:8]}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_layer(layer, path)
        return str(path)


class CronScheduler:
    """Runs ``job.run_once`` at each cron tick until stopped. A failed run is logged and retried next tick."""

    def __init__(self, job: ConsolidationJob, schedule: str, log: Callable[[str], None] = print):
        if not croniter.is_valid(schedule):
            raise ValueError(f"schedule={schedule!r} is not a valid cron expression, e.g. '*/10 * * * *'")
        self.job, self.schedule, self.log = job, schedule, log
        self.stop_event = threading.Event()
        self.runs: list[ConsolidationResult] = []
        self.last_error = ""

    def next_time(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        base = datetime.fromtimestamp(now, tz=timezone.utc)
        return croniter(self.schedule, base).get_next(float)

    def run(self, max_runs: int | None = None) -> None:
        while not self.stop_event.is_set() and (max_runs is None or len(self.runs) < max_runs):
            due = self.next_time()
            self.log(f"consolidate: next run at {datetime.fromtimestamp(due, tz=timezone.utc).isoformat()}")
            if self.stop_event.wait(max(0.0, due - time.time())):
                break
            try:
                result = self.job.run_once()
            except Exception as e:  # keep the schedule alive; the error is reported and retried
                self.last_error = f"{type(e).__name__}: {e}"
                self.log(f"consolidate: run failed: {self.last_error}")
                continue
            self.runs.append(result)
            self.log(
                f"consolidate: merged {result.merged} entries into {result.clusters} "
                f"(conflicts {result.conflicts}, watermark {result.watermark}, {result.seconds:.2f}s)"
            )

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="consolidation-cron", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stop_event.set()
