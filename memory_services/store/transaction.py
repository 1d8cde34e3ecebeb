"""A write transaction of the memory store: reads through the store's view, buffers rows and
key-value changes, and becomes one frame when the transaction commits."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from .entry import Entry, VersionConflict, entry_from_row
from .frames import entry_schema
from .view import StoreView

DEFAULT_NAMESPACE = "default"


class Transaction:
    """Changes made inside ``MemoryStore.transaction()``; committed as one frame, or not at all."""

    def __init__(self, view: StoreView, dim: int):
        self._view, self.dim = view, dim
        self.seq = view.seq
        self.kv = dict(view.kv)
        self._rows: dict[str, dict[str, Any]] = {}
        self._idem: list[dict[str, Any]] = []

    @property
    def snapshot_seq(self) -> int:
        return self._view.seq

    def get(self, entry_id: str) -> Entry | None:
        """The newest state of ``entry_id`` (tombstones included), this transaction's changes first."""
        row = self._rows.get(entry_id)
        if row is None:
            pos = self._view.loc.get(entry_id)
            row = None if pos is None else self._view.row(pos)
        return None if row is None else entry_from_row(row)

    def _check(self, entry_id: str, expected_version: int | None) -> Entry | None:
        cur = self.get(entry_id)
        if expected_version is not None:
            have = -1 if cur is None or cur.deleted else cur.version
            if have != expected_version:
                state = "does not exist" if have == -1 else f"is at version {have}"
                raise VersionConflict(entry_id, have, expected_version, f"entry {entry_id!r} {state}, expected "
                                      f"{'none' if expected_version == -1 else f'version {expected_version}'}")
        return cur

    def put(self, entry_id: str, text: str, embedding: np.ndarray, metadata: dict[str, Any] | None = None,
            namespace: str = DEFAULT_NAMESPACE, expected_version: int | None = None) -> Entry:
        """Insert or replace; ``expected_version=-1`` means 'must not exist (or be deleted)'."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if emb.shape[0] != self.dim:
            raise ValueError(f"embedding of {entry_id!r} has {emb.shape[0]} dims, the store has {self.dim}")
        cur = self._check(entry_id, expected_version)
        now = time.time()
        self.seq += 1
        row = {
            "id": entry_id, "namespace": namespace, "text": text, "embedding": emb.tolist(),
            "metadata": json.dumps(metadata or {}, sort_keys=True, separators=(",", ":")),
            "created": now if cur is None or cur.deleted else cur.created, "updated": now,
            "version": 0 if cur is None else cur.version + 1, "seq": self.seq, "deleted": False,
        }
        self._rows.pop(entry_id, None)  # keep rows in seq order
        self._rows[entry_id] = row
        return entry_from_row(row)

    def delete(self, entry_id: str, expected_version: int | None = None) -> Entry:
        """Tombstone: id, namespace and version stay (scans since a watermark see the delete); content goes."""
        cur = self._check(entry_id, expected_version)
        if cur is None or cur.deleted:
            raise KeyError(entry_id)
        self.seq += 1
        row = {
            "id": entry_id, "namespace": cur.namespace, "text": None, "embedding": None, "metadata": None,
            "created": cur.created, "updated": time.time(), "version": cur.version + 1, "seq": self.seq,
            "deleted": True,
        }
        self._rows.pop(entry_id, None)
        self._rows[entry_id] = row
        return entry_from_row(row)

    def idempotency(self, key: str) -> dict[str, Any] | None:
        return self._view.idem.get(key)

    def record_idempotency(self, key: str, fingerprint: str, ids: list[str]) -> None:
        self._idem.append({"key": key, "fp": fingerprint, "ids": ids, "time": time.time()})

    @property
    def dirty(self) -> bool:
        return bool(self._rows or self._idem or self.kv != self._view.kv)

    def frame_parts(self) -> tuple[pa.RecordBatch, dict[str, Any]]:
        kv = {k: v for k, v in self.kv.items() if self._view.kv.get(k) != v}
        kv.update({k: None for k in self._view.kv if k not in self.kv})
        batch = pa.RecordBatch.from_pylist(list(self._rows.values()), schema=entry_schema(self.dim))
        return batch, {"seq": self.seq, "kv": kv, "idem": self._idem, "time": time.time()}
