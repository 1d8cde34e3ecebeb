"""Shared test data for memory_services: near-duplicate clusters of embeddings, exactly-once checks."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from trainmem.memory_services import MemoryStore, normalize, sources_of


def clustered(n_clusters: int = 20, n_single: int = 40, dim: int = 32, seed: int = 0):
    """(texts, unit embeddings, group labels): clusters of 2-4 near-duplicates plus singletons."""
    rng = np.random.default_rng(seed)
    texts, vecs, groups = [], [], []
    for c in range(n_clusters):
        base = rng.standard_normal(dim)
        for j in range(2 + c % 3):
            vecs.append(base + 0.05 * rng.standard_normal(dim))
            texts.append(f"fact {c} said way {j}")
            groups.append(c)
    for s in range(n_single):
        vecs.append(rng.standard_normal(dim))
        texts.append(f"lone fact {s}")
        groups.append(-1 - s)
    return texts, normalize(np.asarray(vecs)), groups


def representation(store: MemoryStore) -> Counter:
    """How many live entries stand for each original id."""
    live = store.live()
    counts: Counter = Counter()
    for entry_id, meta in zip(live.column("id").to_pylist(), live.column("metadata").to_pylist()):
        counts.update(sources_of(entry_id, json.loads(meta)))
    return counts
