"""The memory store: versioned entries in an append-only log of Arrow frames.

Layout of the store directory::

    MANIFEST.json       store id, dimension, generation, base file, segments (switched atomically)
    base-000003.arrow   compacted rows (newest row per id), memory-mapped
    seg-000007.log      frames appended since; the last segment is the active one
    lock                the writers' lock (flock)

A write is one transaction: take the writers' lock, read frames other writers appended, check
expected versions (compare-and-swap) and idempotency keys, append ONE frame, ``fdatasync``,
acknowledge. Its cost is its own size plus one sync, whatever the store holds. Readers never
take the lock: they read whole frames past their offset and skip a torn tail. ``compact``
folds the log into a new base (the sleep-time maintenance that consolidation runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .. import faults
from .entry import Entry, IdempotencyConflict, entry_from_row
from .filters import compile_where
from .frames import (
    MANIFEST,
    Manifest,
    StoreCorrupt,
    encode_frame,
    entry_schema,
    fsync_dir,
    read_base,
    read_frames,
    write_base,
)
from .transaction import DEFAULT_NAMESPACE, Transaction
from .view import StoreView
IDEMPOTENCY_TTL_S = 24 * 3600.0


def embeddings_of(table: pa.Table) -> np.ndarray:
    """(rows, dim) float32 array of a table's embedding column (tombstones have none: zeros)."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    if col.null_count:
        col = col.fill_null(pa.scalar([0.0] * dim, col.type))
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


class MemoryStore:
    """A versioned entry store in one directory, safe across threads and processes."""

    def __init__(self, path: str | Path, dim: int, lock_timeout_s: float = 30.0, segment_bytes: int = 64 << 20):
        self.dir = Path(path)
        if self.dir.suffix == ".parquet" or self.dir.is_file():
            raise ValueError(f"store_path={str(path)!r} must be a directory (the store is a log of Arrow frames); "
                             "a .parquet file is the format of trainmem < 0.2 (fix: point store_path at a new directory)")
        self.dim, self.lock_timeout_s, self.segment_bytes = dim, lock_timeout_s, segment_bytes
        self.schema = entry_schema(dim)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.dir / "lock"
        self._write_mutex = threading.RLock()
        self._view_mutex = threading.RLock()
        self._view = StoreView(self.schema)
        self._manifest: Manifest | None = None
        self._manifest_stamp: tuple | None = None
        self._seg_index, self._offset = 0, 0
        self._fd: int | None = None
        self._fd_segment = ""
        if not (self.dir / MANIFEST).exists():
            with self._locked():
                if not (self.dir / MANIFEST).exists():
                    self._create()
        self.refresh()
        if self._manifest.dim != dim:
            raise ValueError(f"embedding_dim={dim} but the store at {self.dir} holds {self._manifest.dim}-dim "
                             "embeddings (fix: services.embedding_dim, or another store_path)")

    # -- files ----------------------------------------------------------------------------
    def _create(self) -> None:
        manifest = Manifest(store_id=uuid.uuid4().hex, dim=self.dim, segments=["seg-000001.log"])
        (self.dir / manifest.segments[0]).touch()
        fsync_dir(self.dir)
        manifest.write(self.dir)

    @property
    def store_id(self) -> str:
        return self._manifest.store_id

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._write_mutex:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + self.lock_timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"memory store lock {self._lock_path} held by another writer for more than "
                                f"{self.lock_timeout_s}s (fix: wait, or find the stuck writer: fuser {self._lock_path})"
                            ) from None
                        time.sleep(0.002)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    # -- reading the log (no lock) ----------------------------------------------------------
    def refresh(self) -> None:
        """Read what other writers appended since the last call (cheap when nothing changed)."""
        with self._view_mutex:
            for _ in range(8):
                try:
                    self._follow(repair=False)
                    return
                except FileNotFoundError:  # a compaction replaced the files under us: start over
                    self._manifest_stamp = None
                    self._manifest = None
                    time.sleep(0.01)
            raise StoreCorrupt(f"{self.dir}: files kept disappearing while reading (is a compaction looping?)")

    def _follow(self, repair: bool) -> None:
        st = os.stat(self.dir / MANIFEST)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._manifest_stamp:
            manifest = Manifest.read(self.dir)
            old = self._manifest
            if old is None or (manifest.generation, manifest.store_id) != (old.generation, old.store_id):
                self._load_base(manifest)
            self._manifest, self._manifest_stamp = manifest, stamp
        self._tail(repair)

    def _load_base(self, manifest: Manifest) -> None:
        view = StoreView(self.schema)
        if manifest.base:
            batches, meta = read_base(self.dir / manifest.base)
            for batch in batches:
                view.apply(batch, {})
            view.apply(pa.RecordBatch.from_pylist([], schema=self.schema), meta)
        self._view, self._seg_index, self._offset = view, 0, 0

    def _tail(self, repair: bool) -> None:
        segments = self._manifest.segments
        while True:
            path = self.dir / segments[self._seg_index]
            last = self._seg_index == len(segments) - 1
            if os.path.getsize(path) > self._offset:
                scan = read_frames(path, self._offset)
                for batch, txn in scan.frames:
                    self._view.apply(batch, txn)
                self._offset = scan.end
                if scan.tail:
                    self._bad_tail(path, scan.tail, last, repair)
                    return
            if last:
                return
            self._seg_index, self._offset = self._seg_index + 1, 0

    def _bad_tail(self, path: Path, tail: str, last: bool, repair: bool) -> None:
        where = f"{path} after byte {self._offset}"
        if tail == "corrupt" or not last:
            if not repair:  # a reader may race the repair of a torn frame: look again once
                time.sleep(0.01)
                scan = read_frames(path, self._offset)
                if not scan.tail or scan.tail == "partial" and last:
                    for batch, txn in scan.frames:
                        self._view.apply(batch, txn)
                    self._offset = scan.end
                    return
            raise StoreCorrupt(f"{where}: a whole frame fails its checksum (disk damage?); the store stops here "
                               "rather than drop data (fix: restore the directory from a backup)")
        if repair:  # a frame cut short by a crash: never acknowledged, so it goes
            with open(path, "rb+") as f:
                f.truncate(self._offset)
                os.fsync(f.fileno())

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, label: str = "") -> Iterator[Transaction]:
        """All changes made on the yielded Transaction land in one durable frame, or none do.

        ``label`` names the transaction for kill points (``store.commit:<label>``).
        """
        with self._locked():
            self._follow_locked()
            txn = Transaction(self._view, self.dim)
            yield txn
            if txn.dirty:
                self._append(txn, label)

    def _follow_locked(self) -> None:
        """Catch up under the writers' lock, repairing a torn tail left by a crashed writer."""
        with self._view_mutex:
            for _ in range(8):
                try:
                    self._follow(repair=True)
                    return
                except FileNotFoundError:
                    self._manifest_stamp = self._manifest = None
            raise StoreCorrupt(f"{self.dir}: files kept disappearing under the writers' lock")

    def _append(self, txn: Transaction, label: str) -> None:
        batch, meta = txn.frame_parts()
        frame = encode_frame(batch, meta)
        segment = self._manifest.segments[-1]
        if self._fd_segment != segment:
            self._close_fd()
            self._fd = os.open(self.dir / segment, os.O_WRONLY | os.O_APPEND)
            self._fd_segment = segment
        start = self._offset
        if faults.armed(f"store.commit:{label}"):
            os.write(self._fd, frame[: len(frame) // 2])
            os.fdatasync(self._fd)
            faults.kill_point(f"store.commit:{label}")
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view):]
        os.fdatasync(self._fd)
        with self._view_mutex:
            # A reader in this process may already have read our frame back from the file.
            if self._offset == start:
                self._view.apply(batch, meta)
                self._offset += len(frame)
            if self._offset >= self.segment_bytes:
                self._roll()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._fd_segment = None, ""

    def _roll(self) -> None:
        """Start a new active segment (under the lock)."""
        name = f"seg-{int(self._manifest.segments[-1][4:10]) + 1:06d}.log"
        (self.dir / name).touch()
        fsync_dir(self.dir)
        self._manifest.segments.append(name)
        self._manifest.write(self.dir)
        st = os.stat(self.dir / MANIFEST)
        self._manifest_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._seg_index, self._offset = len(self._manifest.segments) - 1, 0

    def log_bytes(self) -> int:
        return sum(os.path.getsize(self.dir / s) for s in self._manifest.segments)

    def compact(self) -> dict[str, Any]:
        """Fold base + log into a new base holding the newest row of every id (tombstones too, without content)."""
        t0 = time.perf_counter()
        with self._locked():
            self._follow_locked()
            view, old = self._view, self._manifest  # frozen: no writer can append while we hold the lock
            table = view.take(view.positions(0))
            cutoff = time.time() - IDEMPOTENCY_TTL_S
            meta = {"seq": view.seq, "kv": view.kv, "idem": [r for r in view.idem.values() if r["time"] > cutoff]}
            gen = old.generation + 1
            base = f"base-{gen:06d}.arrow"
            write_base(self.dir / base, table, meta)
            segment = f"seg-{int(old.segments[-1][4:10]) + 1:06d}.log"
            (self.dir / segment).touch()
            fsync_dir(self.dir)
            Manifest(old.store_id, old.dim, gen, base, view.seq, [segment]).write(self.dir)
            self._close_fd()
            for name in [*old.segments, *([old.base] if old.base else [])]:
                (self.dir / name).unlink(missing_ok=True)
            self._follow_locked()
        return {"rows": len(table), "generation": gen, "seconds": time.perf_counter() - t0}

    def maybe_compact(self, min_log_bytes: int = 64 << 20) -> dict[str, Any] | None:
        """Compact once the log outgrows both ``min_log_bytes`` and half the base."""
        self.refresh()
        base = self.dir / self._manifest.base if self._manifest.base else None
        base_bytes = base.stat().st_size if base and base.exists() else 0
        if self.log_bytes() > max(min_log_bytes, base_bytes // 2):
            return self.compact()
        return None

    # -- entry operations -------------------------------------------------------------------
    def add(self, texts: list[str], embeddings: np.ndarray, metadata: list[dict[str, Any]] | None = None,
            ids: list[str] | None = None, namespace: str | list[str] = DEFAULT_NAMESPACE,
            idempotency_key: str | None = None) -> list[Entry]:
        """New entries (client-chosen ids must not be live); a repeated ``idempotency_key`` returns the first result."""
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(texts), -1)
        metadata = metadata or [{} for _ in texts]
        namespaces = [namespace] * len(texts) if isinstance(namespace, str) else list(namespace)
        fingerprint = _fingerprint(texts, embeddings, metadata, ids, namespaces) if idempotency_key else ""
        with self.transaction() as txn:
            if idempotency_key:
                done = txn.idempotency(idempotency_key)
                if done is not None:
                    if done["fp"] != fingerprint:
                        raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used for a different request")
                    return [txn.get(i) for i in done["ids"]]
            chosen = ids or [uuid.uuid4().hex for _ in texts]
            out = [txn.put(i, t, e, m, ns, expected_version=-1)
                   for i, t, e, m, ns in zip(chosen, texts, embeddings, metadata, namespaces)]
            if idempotency_key:
                txn.record_idempotency(idempotency_key, fingerprint, [e.id for e in out])
            return out

    def update(self, entry_id: str, *, text: str | None = None, embedding: np.ndarray | None = None,
               metadata: dict[str, Any] | None = None, namespace: str | None = None,
               expected_version: int | None = None) -> Entry:
        """Change some fields of a live entry; with ``expected_version`` only if it is still at that version."""
        with self.transaction() as txn:
            cur = txn.get(entry_id)
            if cur is None or cur.deleted:
                raise KeyError(entry_id)
            return txn.put(
                entry_id, cur.text if text is None else text, cur.embedding if embedding is None else embedding,
                cur.metadata if metadata is None else metadata, cur.namespace if namespace is None else namespace,
                expected_version=cur.version if expected_version is None else expected_version,
            )

    def upsert(self, entry_id: str, text: str, embedding: np.ndarray, metadata: dict[str, Any] | None = None,
               namespace: str = DEFAULT_NAMESPACE, expected_version: int | None = None) -> Entry:
        with self.transaction() as txn:
            return txn.put(entry_id, text, embedding, metadata, namespace, expected_version)

    def delete(self, ids: list[str], expected_versions: list[int | None] | None = None,
               missing_ok: bool = False) -> list[Entry]:
        """Tombstone entries; unknown or already deleted ids raise KeyError unless ``missing_ok``."""
        with self.transaction() as txn:
            out = []
            for entry_id, version in zip(ids, expected_versions or [None] * len(ids)):
                cur = txn.get(entry_id)
                if (cur is None or cur.deleted) and missing_ok:
                    continue
                out.append(txn.delete(entry_id, version))
            return out

    def get(self, entry_id: str, include_deleted: bool = False) -> Entry | None:
        self.refresh()
        with self._view_mutex:
            pos = self._view.loc.get(entry_id)
            entry = None if pos is None else entry_from_row(self._view.row(pos))
        return entry if entry is None or include_deleted or not entry.deleted else None

    def get_many(self, ids: list[str]) -> list[Entry | None]:
        self.refresh()
        with self._view_mutex:
            rows = [self._view.loc.get(i) for i in ids]
            out = [None if p is None else entry_from_row(self._view.row(p)) for p in rows]
        return [e if e is not None and not e.deleted else None for e in out]

    def entries_json(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Live entries as the HTTP API returns them (no embeddings), read in one vectorized pass."""
        self.refresh()
        with self._view_mutex:
            v = self._view
            found = sorted({p for p in (v.loc.get(i) for i in ids) if p is not None})
            table = v.take(np.asarray(found, np.int64)).drop_columns(["embedding"]) if found else None
        if table is None:
            return {}
        cols = table.to_pydict()
        out = {}
        for i, entry_id in enumerate(cols["id"]):
            if cols["deleted"][i]:
                continue
            out[entry_id] = {"id": entry_id, "namespace": cols["namespace"][i], "text": cols["text"][i],
                             "metadata": json.loads(cols["metadata"][i] or "{}"), "version": cols["version"][i],
                             "created": cols["created"][i], "updated": cols["updated"][i]}
        return out

    def scan(self, since: int = 0, include_deleted: bool = True) -> pa.Table:
        """The newest row of every entry written after watermark ``since`` (tombstones unless told otherwise)."""
        self.refresh()
        with self._view_mutex:
            return self._view.take(self._view.positions(since, include_deleted))

    def live(self) -> pa.Table:
        return self.scan(0, include_deleted=False)

    def snapshot(self) -> tuple[pa.Table, int, dict[str, str]]:
        """Live rows, the write counter and the key-value table, all as of one moment."""
        self.refresh()
        with self._view_mutex:
            v = self._view
            return v.take(v.positions(0, include_deleted=False)), v.seq, dict(v.kv)

    def list_entries(self, namespace: str | list[str] | None = None, where: dict[str, Any] | None = None,
                     limit: int = 100, after: str | None = None) -> tuple[list[Entry], str | None]:
        """A page of live entries in (created, id) order; pass the returned cursor as ``after`` for the next."""
        pred = compile_where(where)
        self.refresh()
        with self._view_mutex:
            v = self._view
            mask = v.current.view & ~v.deleted.view
            if namespace is not None:
                mask &= v.namespace_mask([namespace] if isinstance(namespace, str) else list(namespace))
            created = v.created.view
            after_created, after_id = _decode_cursor(after) if after else (-1.0, "")
            mask &= created >= after_created
            cand = np.flatnonzero(mask)
            order = cand[np.argsort(created[cand], kind="stable")]
            out: list[Entry] = []
            for pos in order:
                entry = entry_from_row(v.row(int(pos)))
                if (entry.created, entry.id) <= (after_created, after_id):
                    continue
                if pred is None or pred(entry.metadata):
                    out.append(entry)
                    if len(out) > limit:
                        break
        more = len(out) > limit
        out = out[:limit]
        return out, (_encode_cursor(out[-1]) if more else None)

    def kv(self) -> dict[str, str]:
        self.refresh()
        with self._view_mutex:
            return dict(self._view.kv)

    def current_seq(self) -> int:
        """The store's write counter (after reading what other writers appended)."""
        self.refresh()
        return self._view.seq

    def stats(self) -> dict[str, int]:
        self.refresh()
        with self._view_mutex:
            v = self._view
            return {"rows": len(v.loc), "live": v.live_count(), "seq": v.seq}

    def close(self) -> None:
        with self._write_mutex:
            self._close_fd()


def _fingerprint(texts, embeddings, metadata, ids, namespaces) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([texts, metadata, ids, namespaces], sort_keys=True).encode())
    h.update(np.ascontiguousarray(embeddings, np.float32).tobytes())
    return h.hexdigest()


def _encode_cursor(entry: Entry) -> str:
    return f"{entry.created!r}~{entry.id}"


def _decode_cursor(cursor: str) -> tuple[float, str]:
    created, sep, entry_id = cursor.partition("~")
    try:
        return float(created), entry_id
    except ValueError:
        raise ValueError(f"after={cursor[:60]!r} is not a cursor returned by a previous page") from None
