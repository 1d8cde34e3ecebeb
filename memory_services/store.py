"""The memory store: an Arrow table of entries persisted as one Parquet file.

Each entry: id, text, embedding, metadata (JSON), created_at, updated_at, version, seq, deleted.
``seq`` is a store-wide write counter: every add, update and tombstone gets the next one, so
"everything written since watermark W" is ``seq > W``. Every mutation is a transaction under an
exclusive file lock: re-read the file if another process changed it, check expected versions
(compare-and-swap), write a temp file, fsync, rename. A crash leaves the old file or the new
one, never a torn one; a writer never overwrites rows it did not read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_KV_PREFIX = b"trainmem.kv."
_SEQ_KEY = b"trainmem.seq"


class VersionConflict(RuntimeError):
    """A compare-and-swap write found a different version than the caller expected."""


@dataclass
class Entry:
    id: str
    text: str
    embedding: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    seq: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    deleted: bool = False


def schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("metadata", pa.string()),
            ("created_at", pa.float64()),
            ("updated_at", pa.float64()),
            ("version", pa.int64()),
            ("seq", pa.int64()),
            ("deleted", pa.bool_()),
        ]
    )


def embeddings_of(table: pa.Table) -> np.ndarray:
    """(rows, dim) float32 view of a table's embedding column."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """temp + fsync + rename + fsync(dir): readers see the old bytes or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Transaction:
    """Pending changes on a snapshot; applied by ``MemoryStore.transaction`` in one atomic write."""

    def __init__(self, table: pa.Table, seq: int, kv: dict[str, str], dim: int):
        self.table, self.seq, self.kv, self.dim = table, seq, dict(kv), dim
        self._index = {id_: i for i, id_ in enumerate(table.column("id").to_pylist())}
        self._new: dict[str, dict[str, Any]] = {}

    def get(self, entry_id: str) -> Entry | None:
        if entry_id in self._new:
            return _row_to_entry(self._new[entry_id])
        i = self._index.get(entry_id)
        return None if i is None else _row_to_entry(self.table.slice(i, 1).to_pylist()[0])

    def _check(self, entry_id: str, expected_version: int | None) -> Entry | None:
        cur = self.get(entry_id)
        if expected_version is not None:
            have = -1 if cur is None else cur.version
            if have != expected_version:
                raise VersionConflict(f"entry {entry_id!r} is at version {have}, expected {expected_version}")
        return cur

    def put(
        self,
        entry_id: str,
        text: str,
        embedding: np.ndarray,
        metadata: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> Entry:
        """Insert or replace; ``expected_version=-1`` means 'must not exist yet'."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if emb.shape[0] != self.dim:
            raise ValueError(f"embedding of {entry_id!r} has {emb.shape[0]} dims, the store has {self.dim}")
        cur = self._check(entry_id, expected_version)
        now = time.time()
        self.seq += 1
        row = {
            "id": entry_id,
            "text": text,
            "embedding": emb.tolist(),
            "metadata": json.dumps(metadata or {}, sort_keys=True),
            "created_at": now if cur is None or cur.deleted else cur.created_at,
            "updated_at": now,
            "version": 0 if cur is None else cur.version + 1,
            "seq": self.seq,
            "deleted": False,
        }
        self._new[entry_id] = row
        return _row_to_entry(row)

    def delete(self, entry_id: str, expected_version: int | None = None) -> Entry:
        """Tombstone: the row stays (so scans since a watermark see the delete), marked deleted."""
        cur = self._check(entry_id, expected_version)
        if cur is None:
            raise KeyError(entry_id)
        self.seq += 1
        row = _entry_to_row(cur)
        row.update(version=cur.version + 1, seq=self.seq, deleted=True, updated_at=time.time())
        self._new[entry_id] = row
        return _row_to_entry(row)

    def result(self) -> pa.Table:
        if not self._new:
            return self.table
        keep = pc.invert(pc.is_in(self.table.column("id"), pa.array(list(self._new), pa.string())))
        fresh = pa.Table.from_pylist(list(self._new.values()), schema=schema(self.dim))
        return pa.concat_tables([self.table.filter(keep), fresh]).combine_chunks()

    @property
    def dirty(self) -> bool:
        return bool(self._new)


def _row_to_entry(row: dict[str, Any]) -> Entry:
    return Entry(
        id=row["id"],
        text=row["text"],
        embedding=np.asarray(row["embedding"], dtype=np.float32),
        metadata=json.loads(row["metadata"] or "{}"),
        version=int(row["version"]),
        seq=int(row["seq"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        deleted=bool(row["deleted"]),
    )


def _entry_to_row(e: Entry) -> dict[str, Any]:
    return {
        "id": e.id,
        "text": e.text,
        "embedding": np.asarray(e.embedding, dtype=np.float32).tolist(),
        "metadata": json.dumps(e.metadata, sort_keys=True),
        "created_at": e.created_at,
        "updated_at": e.updated_at,
        "version": e.version,
        "seq": e.seq,
        "deleted": e.deleted,
    }


class MemoryStore:
    """A Parquet-persisted, versioned entry store, safe across threads and processes."""

    def __init__(self, path: str | Path, dim: int, lock_timeout_s: float = 30.0):
        self.path = Path(path)
        self.dim = dim
        self.lock_timeout_s = lock_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.RLock()
        self._stamp: tuple[int, int, int] | None = None
        self._table = schema(dim).empty_table()
        self._seq = 0
        self._kv: dict[str, str] = {}

    # -- locking and reload -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
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
                                f"memory store lock {self._lock_path} held by another process for "
                                f"> {self.lock_timeout_s}s (fix: wait, or find the stuck writer)"
                            ) from None
                        time.sleep(0.005)
                self._refresh()
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        table = pq.read_table(self.path)
        if table.schema.field("embedding").type.list_size != self.dim:
            raise ValueError(
                f"{self.path}: embeddings have {table.schema.field('embedding').type.list_size} dims, "
                f"the config says {self.dim} (fix: services.embedding_dim)"
            )
        meta = table.schema.metadata or {}
        self._seq = int(meta.get(_SEQ_KEY, b"0"))
        self._kv = {k[len(_KV_PREFIX) :].decode(): v.decode() for k, v in meta.items() if k.startswith(_KV_PREFIX)}
        self._table = table.replace_schema_metadata(None).cast(schema(self.dim))
        self._stamp = stamp

    def _persist(self, table: pa.Table, seq: int, kv: dict[str, str]) -> None:
        meta = {_SEQ_KEY: str(seq).encode()}
        meta.update({_KV_PREFIX + k.encode(): v.encode() for k, v in kv.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd")
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())
        st = os.stat(self.path)
        self._table, self._seq, self._kv = table, seq, dict(kv)
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """All changes made on the yielded Transaction land in one atomic write, or none do."""
        with self._locked():
            txn = Transaction(self._table, self._seq, self._kv, self.dim)
            yield txn
            if txn.dirty or txn.kv != self._kv:
                self._persist(txn.result(), txn.seq, txn.kv)

    # -- convenience operations (each one transaction) ----------------------------------------
    def add(
        self,
        texts: list[str],
        embeddings: np.ndarray,
        metadata: list[dict[str, Any]] | None = None,
        ids: list[str] | None = None,
    ) -> list[Entry]:
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(texts), -1)
        ids = ids or [uuid.uuid4().hex for _ in texts]
        metadata = metadata or [{} for _ in texts]
        with self.transaction() as txn:
            return [
                txn.put(i, t, e, m, expected_version=-1) for i, t, e, m in zip(ids, texts, embeddings, metadata)
            ]

    def update(
        self,
        entry_id: str,
        *,
        text: str | None = None,
        embedding: np.ndarray | None = None,
        metadata: dict[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> Entry:
        with self.transaction() as txn:
            cur = txn.get(entry_id)
            if cur is None or cur.deleted:
                raise KeyError(entry_id)
            return txn.put(
                entry_id,
                cur.text if text is None else text,
                cur.embedding if embedding is None else embedding,
                cur.metadata if metadata is None else metadata,
                expected_version=cur.version if expected_version is None else expected_version,
            )

    def delete(self, ids: list[str], expected_versions: list[int] | None = None) -> list[Entry]:
        with self.transaction() as txn:
            exp = expected_versions or [None] * len(ids)
            return [txn.delete(i, v) for i, v in zip(ids, exp)]

    def get(self, entry_id: str) -> Entry | None:
        with self._locked():
            return Transaction(self._table, self._seq, self._kv, self.dim).get(entry_id)

    def scan(self, since: int = 0, include_deleted: bool = True) -> pa.Table:
        """Rows written after watermark ``since`` (tombstones included unless told otherwise)."""
        with self._locked():
            table = self._table
        mask = pc.greater(table.column("seq"), since)
        if not include_deleted:
            mask = pc.and_(mask, pc.invert(table.column("deleted")))
        return table.filter(mask)

    def live(self) -> pa.Table:
        return self.scan(0, include_deleted=False)

    def kv(self) -> dict[str, str]:
        with self._locked():
            return dict(self._kv)

    def current_seq(self) -> int:
        """The store's write counter (re-read from disk if another process wrote)."""
        with self._locked():
            return self._seq

    def stats(self) -> dict[str, int]:
        with self._locked():
            live = len(self._table) - pc.sum(self._table.column("deleted")).as_py() if len(self._table) else 0
            return {"rows": len(self._table), "live": int(live or 0), "seq": self._seq}
