"""Sleep-time consolidation: merge near-duplicate memories written since a watermark.

One run, under the cluster-wide lease: snapshot the store (live rows, write counter, this job's
watermark and layer chain) → entries written since the watermark look up their neighbours in
their namespace → pairs at or above ``similarity`` are joined (union-find) → each cluster becomes
one consolidated entry whose metadata lists every original id it stands for → optionally distil
those entries into the served memory layer as a new row-sparse version → commit.

The commit is ONE store transaction: re-check the lease, add the consolidated entries, tombstone
their members only if each is still at the version the job read (compare-and-swap), advance the
watermark (never backwards) and name the new layer version. When a member changed meanwhile and
the layer was distilled, the transaction is abandoned, the cluster dropped and the layer
re-distilled, so the committed layer holds exactly the committed clusters. A crash before the
commit changes nothing; after it, a re-run finds nothing new.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from .. import faults
from ..config import ConsolidationConfig, ProductKeyConfig, RetrieverConfig
from ..embedder import normalize
from ..layers.distill import distill, new_layer, read_rows
from ..layers.layer_store import FOLD_AFTER, LayerChain, LayerStore, chain_key
from ..retriever import Retriever
from ..store import MemoryStore, Transaction, embeddings_of
from .lease import Lease

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
    layer_version: int = 0
    """The memory-layer version this run committed (0: none written)."""
    owner: str = ""
    """The lease owner that ran (kind:host:pid:nonce)."""
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


class _Replan(Exception):
    def __init__(self, dropped: list[str]):
        self.dropped = dropped


@dataclass
class _Layer:
    chain: LayerChain
    rows: int


class ConsolidationJob:
    def __init__(
        self,
        store: MemoryStore,
        cfg: ConsolidationConfig | None = None,
        layer_cfg: ProductKeyConfig | None = None,
        retriever_cfg: RetrieverConfig | None = None,
        on_phase: Phase | None = None,
        kind: str = "cli",
        layer_dir: str | Path | None = None,
    ):
        self.store = store
        self.cfg = cfg or ConsolidationConfig()
        self.layer_cfg = layer_cfg or ProductKeyConfig(d_model=store.dim, gated=False)
        # Exact search by default: the job's neighbour lists decide merges and must not vary.
        self.retriever_cfg = retriever_cfg or RetrieverConfig(kind="flat", embedder="none")
        self.on_phase = on_phase or (lambda _: None)
        self.kind = kind
        self.layers = LayerStore(layer_dir or (Path(self.cfg.layer_dir) if self.cfg.layer_dir else store.dir / "layer"))

    @property
    def watermark_key(self) -> str:
        return f"watermark.{self.cfg.job_name}"

    @property
    def layer_key(self) -> str:
        return chain_key(self.cfg.job_name)

    def current_chain(self) -> LayerChain | None:
        raw = self.store.kv().get(self.layer_key)
        return LayerChain.from_json(raw) if raw else None

    def run_once(self) -> ConsolidationResult:
        """One run; raises LeaseHeld (naming the holder) if another run is in progress anywhere."""
        t0 = time.perf_counter()
        lease = Lease(self.store, f"consolidation.{self.cfg.job_name}", self.kind, self.cfg.lease_ttl_s)
        with lease:
            self.on_phase(f"lease {lease.owner}")
            faults.kill_point("consolidate.before_plan")
            result = self._run(lease)
            faults.kill_point("consolidate.after_commit")
        result.owner, result.seconds = lease.owner, time.perf_counter() - t0
        self.on_phase(f"done clusters={result.clusters} conflicts={result.conflicts}")
        return result

    def _run(self, lease: Lease) -> ConsolidationResult:
        live, snap_seq, kv = self.store.snapshot()
        watermark = int(kv.get(self.watermark_key, "0"))
        new_rows = np.flatnonzero(live.column("seq").to_numpy() > watermark)
        result = ConsolidationResult(scanned=len(new_rows), watermark=watermark)
        self.on_phase(f"scan new={len(new_rows)} live={len(live)} watermark={watermark}")
        plans = self._plan(live, new_rows) if len(new_rows) else []
        self.on_phase(f"clusters {len(plans)}")
        raw_chain = kv.get(self.layer_key)
        for _ in range(8):
            layer = None
            if plans and self.cfg.distill:
                self.on_phase("distill")
                layer = self._distill(plans, LayerChain.from_json(raw_chain) if raw_chain else None, live)
            self.on_phase("commit")
            try:
                with self.store.transaction(label="consolidation") as txn:
                    lease.check(txn)
                    if txn.kv.get(self.layer_key) != raw_chain:  # someone set the layer up meanwhile
                        raw_chain = txn.kv.get(self.layer_key)
                        raise _Replan([])
                    self._commit(txn, plans, layer, snap_seq, result)
                break
            except _Replan as e:
                plans = [p for p in plans if p["id"] not in e.dropped]
                result.conflicts += len(e.dropped)
        else:
            raise RuntimeError("consolidation: members kept changing during 8 attempts; try again later")
        self.layers.gc(self.current_chain())
        compacted = self.store.maybe_compact(self.cfg.compact_log_bytes)
        if compacted:
            self.on_phase(f"compacted store: {compacted['rows']} rows in {compacted['seconds']:.2f}s")
        return result

    def _commit(self, txn: Transaction, plans: list[dict], layer: _Layer | None, snap_seq: int,
                result: ConsolidationResult) -> None:
        changed = [p["id"] for p in plans if not self._members_unchanged(txn, p)]
        if changed and layer is not None:
            raise _Replan(changed)
        concurrent = txn.snapshot_seq != snap_seq
        for plan in plans:
            if plan["id"] in changed:
                result.conflicts += 1
                continue
            self._commit_cluster(txn, plan)
            result.clusters += 1
            result.merged += len(plan["members"])
            result.consolidated_ids.append(plan["id"])
        # Writes after the snapshot are past snap_seq and wait for the next run; with none,
        # everything up to this commit is consolidated. The watermark never moves back.
        old = int(txn.kv.get(self.watermark_key, "0"))
        result.watermark = max(old, snap_seq if concurrent else txn.seq)
        txn.kv[self.watermark_key] = str(result.watermark)
        if layer is not None:
            txn.kv[self.layer_key] = layer.chain.to_json()
            result.layer_version = layer.chain.version

    def _plan(self, live: pa.Table, new_rows: np.ndarray) -> list[dict]:
        ids = live.column("id").to_pylist()
        namespaces = live.column("namespace").to_pylist()
        vecs = normalize(embeddings_of(live))
        metas = [json.loads(m or "{}") for m in live.column("metadata").to_pylist()]
        retriever = Retriever(vecs.shape[1], self.retriever_cfg, embed=None)
        retriever.add(ids, vecs, namespaces=namespaces)
        pos = {i: p for p, i in enumerate(ids)}
        k = min(self.cfg.neighbours + 1, len(ids))
        pairs = []
        for ns in sorted(set(namespaces[int(r)] for r in new_rows)):  # never merge across namespaces
            rows = np.asarray([r for r in new_rows if namespaces[r] == ns])
            for start in range(0, len(rows), 1024):
                chunk = rows[start : start + 1024]
                for a, hits in zip(chunk, retriever.search(vecs[chunk], k, namespace=ns)):
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
                    "namespace": namespaces[members[0]],
                    "text": texts[rep],
                    "embedding": centre,
                    "members": [(ids[m], versions[m]) for m in members],
                    # Originals (not earlier consolidations) are the keys distillation learns from.
                    "keys": [(ids[m], vecs[m]) for m in members if "consolidated_from" not in metas[m]],
                    "metadata": {
                        "consolidated_from": origin,
                        "merged": [ids[m] for m in members],
                        "job": self.cfg.job_name,
                        "variants": sorted({texts[m] for m in members})[:16],
                    },
                }
            )
        return plans

    @staticmethod
    def _members_unchanged(txn: Transaction, plan: dict) -> bool:
        for entry_id, version in plan["members"]:
            cur = txn.get(entry_id)
            if cur is None or cur.deleted or cur.version != version:
                return False
        return True

    @staticmethod
    def _commit_cluster(txn: Transaction, plan: dict) -> None:
        existing = txn.get(plan["id"])
        for entry_id, version in plan["members"]:
            txn.delete(entry_id, expected_version=version)
        txn.put(
            plan["id"], plan["text"], plan["embedding"], plan["metadata"], plan["namespace"],
            expected_version=-1 if existing is None or existing.deleted else existing.version,
        )

    # -- distillation into the served layer --------------------------------------------------
    def _distill(self, plans: list[dict], chain: LayerChain | None, live: pa.Table) -> _Layer:
        """A new layer version holding the plans' memories (and keeping the earlier ones it overlaps)."""
        if chain is None:  # the first version: a fresh layer, written as the base
            layer = new_layer(self.layer_cfg)
            base = self.layers.write_base(layer, 0, {"kind": "fresh", "seed": 0})
            chain = LayerChain(0, base, 0, [])
            old_keys, old_sources = torch.zeros(0, self.layer_cfg.d_model), []
        else:
            layer = self.layers.load_layer(chain)
            old_keys, old_sources = self.layers.pairs(chain)
        targets = self._targets(plans, live)
        new_sources = [src for p in plans for src, _ in p["keys"]]
        new_keys = torch.from_numpy(np.stack([v for p in plans for _, v in p["keys"]])) if new_sources else \
            torch.zeros(0, layer.cfg.d_model)
        planned = {s for p in plans for s in p["metadata"]["consolidated_from"]}
        kept = [i for i, s in enumerate(old_sources) if s in targets]
        moved = [i for i in kept if old_sources[i] in planned]  # their memory now lives in a new entry
        stay = [i for i in kept if old_sources[i] not in planned]
        learn_keys = torch.cat([new_keys, old_keys[moved]]) if moved else new_keys
        learn_sources = new_sources + [old_sources[i] for i in moved]
        rows = read_rows(layer, learn_keys)
        # Earlier memories reading any of those rows join the batch, so their answers hold.
        replay: list[int] = []
        if stay:
            with torch.no_grad():
                _, idx = layer.lookup(old_keys[stay].float())
            hit = torch.isin(idx, rows).any(dim=1)
            replay = [stay[i] for i in hit.nonzero().flatten().tolist()]
        keys = torch.cat([learn_keys, old_keys[replay]]) if replay else learn_keys
        sources = learn_sources + [old_sources[i] for i in replay]
        goal = torch.from_numpy(np.stack([targets[s] for s in sources]))
        half = max(1, self.cfg.distill_steps // 2)
        distill(layer, keys, goal, self.cfg.distill_steps, self.cfg.distill_lr, trainable=rows,
                on_step=lambda step: faults.kill_point("consolidate.distill") if step == half else None)
        version = chain.version + 1
        with torch.no_grad():
            values = layer.values.weight.index_select(0, rows)
        delta = self.layers.write_delta(version, rows, values, learn_keys, learn_sources)
        deltas = [*chain.deltas, (version, delta)]
        if len([d for d in deltas if d[0] > chain.base_version]) > FOLD_AFTER:
            _, origin = self.layers.config(chain)
            all_keys, all_sources = self.layers.pairs(LayerChain(version, chain.base, chain.base_version, deltas))
            base = self.layers.write_base(layer, version, origin, all_keys, all_sources)
            return _Layer(LayerChain(version, base, version, [(version, delta)]), len(rows))
        return _Layer(LayerChain(version, chain.base, chain.base_version, deltas), len(rows))

    @staticmethod
    def _targets(plans: list[dict], live: pa.Table) -> dict[str, np.ndarray]:
        """Source id → the embedding of the consolidated entry that stands for it after this commit."""
        targets: dict[str, np.ndarray] = {}
        metas = [json.loads(m or "{}") for m in live.column("metadata").to_pylist()]
        vecs = normalize(embeddings_of(live))
        for meta, vec in zip(metas, vecs):
            for src in meta.get("consolidated_from", []):
                targets[src] = vec
        for plan in plans:
            for src in plan["metadata"]["consolidated_from"]:
                targets[src] = plan["embedding"]
        return targets
