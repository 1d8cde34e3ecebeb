"""The store as one process sees it: the rows of the base file and of every frame read so far.

Rows are numbered by *position* in write order (which is ``seq`` order). Each entry id points
at the position of its newest row; per-position numpy columns (seq, current, deleted, created,
namespace code) make scans, listings and counts vectorized. Rows stay in their Arrow record
batches (the base is memory-mapped); small frame batches are concatenated now and then so a
million one-row writes do not become a million chunks.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import pyarrow as pa

_COALESCE_EVERY = 256
_SMALL_BATCH = 4096


class _Column:
    """A growable numpy column (amortized O(1) appends)."""

    def __init__(self, dtype):
        self.data = np.zeros(1024, dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            grown = np.zeros(max(need, 2 * len(self.data)), self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : need] = values
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self.data[: self.n]


class StoreView:
    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.batches: list[pa.RecordBatch] = []
        self.starts: list[int] = []
        self.n = 0
        self.loc: dict[str, int] = {}
        self.seq_col = _Column(np.int64)
        self.current = _Column(np.bool_)
        self.deleted = _Column(np.bool_)
        self.created = _Column(np.float64)
        self.ns_code = _Column(np.int32)
        self.namespaces: dict[str, int] = {}
        self.kv: dict[str, str] = {}
        self.idem: dict[str, dict[str, Any]] = {}
        self.seq = 0
        self._since_coalesce = 0

    # -- building -----------------------------------------------------------------------------
    def apply(self, batch: pa.RecordBatch, txn: dict[str, Any]) -> None:
        """Append one committed transaction (or a base batch, with ``txn={}``)."""
        if batch.num_rows:
            self._append_rows(batch)
        for key, value in txn.get("kv", {}).items():
            if value is None:
                self.kv.pop(key, None)
            else:
                self.kv[key] = value
        for record in txn.get("idem", []):
            self.idem[record["key"]] = record
        self.seq = max(self.seq, int(txn.get("seq", 0)))

    def _append_rows(self, batch: pa.RecordBatch) -> None:
        start = self.n
        ids = batch.column(0).to_pylist()
        namespaces = batch.column(1).to_pylist()
        codes = np.fromiter((self._ns(ns) for ns in namespaces), np.int32, len(namespaces))
        current = np.ones(len(ids), bool)
        for i, entry_id in enumerate(ids):
            old = self.loc.get(entry_id)
            if old is not None:
                if old >= start:  # the same id twice in one batch: the later row wins
                    current[old - start] = False
                else:
                    self.current.data[old] = False
            self.loc[entry_id] = start + i
        self.batches.append(batch)
        self.starts.append(start)
        self.n += len(ids)
        self.seq_col.extend(batch.column("seq").to_numpy())
        self.current.extend(current)
        self.deleted.extend(batch.column("deleted").to_numpy(zero_copy_only=False))
        self.created.extend(batch.column("created").to_numpy())
        self.ns_code.extend(codes)
        self._since_coalesce += 1
        if self._since_coalesce >= _COALESCE_EVERY:
            self._coalesce()

    def _ns(self, name: str) -> int:
        code = self.namespaces.get(name)
        if code is None:
            code = self.namespaces[name] = len(self.namespaces)
        return code

    def _coalesce(self) -> None:
        """Concatenate the trailing run of small batches into one (positions do not change)."""
        self._since_coalesce = 0
        first = len(self.batches)
        while first > 0 and self.batches[first - 1].num_rows < _SMALL_BATCH:
            first -= 1
        if len(self.batches) - first < 2:
            return
        merged = pa.concat_batches(self.batches[first:])
        self.batches[first:] = [merged]
        self.starts[first:] = [self.starts[first]]

    # -- reading ------------------------------------------------------------------------------
    def _locate(self, pos: int) -> tuple[pa.RecordBatch, int]:
        b = bisect.bisect_right(self.starts, pos) - 1
        return self.batches[b], pos - self.starts[b]

    def row(self, pos: int) -> dict[str, Any]:
        batch, offset = self._locate(pos)
        return batch.slice(offset, 1).to_pylist()[0]

    def take(self, positions: np.ndarray) -> pa.Table:
        """Rows at ``positions`` (ascending), as one table."""
        positions = np.asarray(positions, np.int64)
        if len(positions) == 0:
            return self.schema.empty_table()
        starts = np.asarray(self.starts, np.int64)
        which = np.searchsorted(starts, positions, side="right") - 1
        parts = []
        for b in np.unique(which):
            local = positions[which == b] - starts[b]
            batch = self.batches[b]
            parts.append(batch if len(local) == batch.num_rows else batch.take(pa.array(local)))
        return pa.Table.from_batches(parts, schema=self.schema)

    def positions(self, since: int = 0, include_deleted: bool = True) -> np.ndarray:
        mask = self.current.view & (self.seq_col.view > since)
        if not include_deleted:
            mask &= ~self.deleted.view
        return np.flatnonzero(mask)

    def live_count(self) -> int:
        return int((self.current.view & ~self.deleted.view).sum())

    def namespace_mask(self, names: list[str]) -> np.ndarray:
        codes = [self.namespaces[n] for n in names if n in self.namespaces]
        return np.isin(self.ns_code.view, np.asarray(codes, np.int32))
