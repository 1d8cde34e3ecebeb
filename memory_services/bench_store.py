"""Store measurements of ``trainmem bench memory``: one small write with N entries stored.

Three stores hold the same N entries (dim 64, short text, JSON metadata):
- *rewrite*: trainmem <= 0.1's store, which rewrote and fsynced the whole Parquet file per write;
- *ours*: the append-only Arrow log (one frame + one fdatasync per write, with version checks);
- *lance*: a Lance dataset (``pylance``): append, point read by id (BTREE index), ``merge_insert``.
"""

from __future__ import annotations

import shutil
import statistics
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .store import MemoryStore, embeddings_of
from .store.frames import atomic_write_bytes, entry_schema

DIM = 64


def _table(start: int, n: int) -> pa.Table:
    rng = np.random.default_rng(start)
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    now = time.time()
    return pa.table({
        "id": pa.array([f"e{i}" for i in range(start, start + n)]),
        "namespace": pa.array(["default"] * n),
        "text": pa.array([f"memory number {i} of the benchmark" for i in range(start, start + n)]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
        "metadata": pa.array([f'{{"k":{i % 10}}}' for i in range(start, start + n)]),
        "created": pa.array(np.full(n, now)), "updated": pa.array(np.full(n, now)),
        "version": pa.array(np.zeros(n, np.int64)), "seq": pa.array(np.arange(start + 1, start + n + 1, dtype=np.int64)),
        "deleted": pa.array(np.zeros(n, bool)),
    }, schema=entry_schema(DIM))


def _median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_rewrite(n: int, workdir: Path, writes: int) -> dict:
    """One add the way the old store did it: filter + concat + whole-file Parquet rewrite + fsync + rename."""
    table = pa.concat_tables([_table(s, min(100_000, n - s)) for s in range(0, n, 100_000)]).combine_chunks()
    path = workdir / "rewrite.parquet"

    def write(i: int) -> None:
        nonlocal table
        fresh = _table(10**9 + i, 1)
        keep = pc.invert(pc.is_in(table.column("id"), fresh.column("id")))
        table = pa.concat_tables([table.filter(keep), fresh]).combine_chunks()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())

    ms = _median_ms(write, writes)
    path.unlink(missing_ok=True)
    return {"write_ms": ms, "writes": writes}


def bench_log(n: int, workdir: Path, writes: int) -> dict:
    store = MemoryStore(workdir / "log", DIM)
    t0 = time.perf_counter()
    for s in range(0, n, 100_000):
        t = _table(s, min(100_000, n - s))
        store.add(t.column("text").to_pylist(), embeddings_of(t), ids=t.column("id").to_pylist())
    load_s = time.perf_counter() - t0
    vec = np.ones((1, DIM), np.float32)
    write_ms = _median_ms(lambda i: store.add([f"new {i}"], vec, ids=[f"new-{i}"]), writes)
    update_ms = _median_ms(lambda i: store.update(f"e{i * 7}", text="edited", expected_version=0), writes)
    get_ms = _median_ms(lambda i: store.get(f"e{i * 13}"), writes)
    t0 = time.perf_counter()
    MemoryStore(workdir / "log", DIM).stats()
    reopen_s = time.perf_counter() - t0
    store.close()
    shutil.rmtree(workdir / "log")
    return {"write_ms": write_ms, "update_cas_ms": update_ms, "get_ms": get_ms, "bulk_load_s": load_s,
            "reopen_s": reopen_s, "writes": writes}


def bench_lance(n: int, workdir: Path, writes: int) -> dict:
    try:
        import lance
    except ImportError as e:
        return {"error": f"pylance not installed ({e})"}
    uri = str(workdir / "lance")
    for s in range(0, n, 200_000):
        lance.write_dataset(_table(s, min(200_000, n - s)), uri, mode="append" if s else "create")
    lance.dataset(uri).create_scalar_index("id", index_type="BTREE")
    append_ms = _median_ms(lambda i: lance.write_dataset(_table(2 * 10**9 + i, 1), uri, mode="append"), writes)
    get_ms = _median_ms(lambda i: lance.dataset(uri).to_table(filter=f"id = 'e{i * 13}'"), writes)

    def upsert(i: int) -> None:
        row = _table(i * 7, 1)
        lance.dataset(uri).merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(row)

    upsert_ms = _median_ms(upsert, writes)
    fragments = len(lance.dataset(uri).get_fragments())
    shutil.rmtree(uri)
    # A compare-and-swap write needs a read of the current version and then the write.
    return {"append_ms": append_ms, "get_ms": get_ms, "merge_insert_ms": upsert_ms,
            "cas_write_ms": get_ms + upsert_ms, "fragments_after": fragments, "fsyncs": 0, "writes": writes}


def run(n: int, workdir: Path, writes: int = 20, rewrites: int = 3) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / f"store-{uuid.uuid4().hex[:6]}"
    scratch.mkdir()
    try:
        out = {"entries": n, "dim": DIM, "rewrite": bench_rewrite(n, scratch, rewrites),
               "ours": bench_log(n, scratch, writes), "lance": bench_lance(n, scratch, writes)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
