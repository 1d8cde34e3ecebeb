"""Memory store: versions, compare-and-swap, tombstones, watermark scans, atomic persistence."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from trainmem.memory_services import MemoryStore, VersionConflict


def test_add_update_delete_and_scan_since_watermark(tmp_path):
    store = MemoryStore(tmp_path / "s.parquet", 4)
    a, b = store.add(["a", "b"], np.eye(4)[:2], [{"k": 1}, {}])
    assert (a.version, a.seq, b.seq) == (0, 1, 2)
    mark = store.current_seq()
    a2 = store.update(a.id, text="a2")
    store.delete([b.id])
    since = store.scan(mark)
    assert sorted(since.column("id").to_pylist()) == sorted([a.id, b.id])
    assert store.get(a.id).text == "a2" and store.get(a.id).version == a2.version == 1
    assert store.get(b.id).deleted and store.live().column("id").to_pylist() == [a.id]
    assert store.get(a.id).metadata == {"k": 1}
    reopened = MemoryStore(tmp_path / "s.parquet", 4)
    assert reopened.stats() == store.stats() == {"rows": 2, "live": 1, "seq": 4}


def test_compare_and_swap_rejects_stale_versions(tmp_path):
    store = MemoryStore(tmp_path / "s.parquet", 4)
    (a,) = store.add(["a"], np.ones((1, 4)), ids=["x"])
    store.update("x", text="new", expected_version=0)
    with pytest.raises(VersionConflict):
        store.update("x", text="stale", expected_version=0)
    with pytest.raises(VersionConflict):
        store.add(["dup"], np.ones((1, 4)), ids=["x"])
    with pytest.raises(VersionConflict):
        store.delete(["x"], expected_versions=[0])
    assert store.get("x").text == "new"


def test_failed_transaction_writes_nothing(tmp_path):
    store = MemoryStore(tmp_path / "s.parquet", 4)
    store.add(["a"], np.ones((1, 4)), ids=["a"])
    raw = (tmp_path / "s.parquet").read_bytes()
    with pytest.raises(RuntimeError):
        with store.transaction() as txn:
            txn.put("b", "b", np.ones(4))
            raise RuntimeError("crash before commit")
    assert (tmp_path / "s.parquet").read_bytes() == raw
    assert MemoryStore(tmp_path / "s.parquet", 4).get("b") is None
    assert not list(tmp_path.glob(".*tmp*"))


def test_concurrent_writers_lose_nothing(tmp_path):
    def writer(tag: str) -> None:
        own = MemoryStore(tmp_path / "s.parquet", 4)  # own file descriptor: the flock really contends
        for i in range(25):
            own.add([f"{tag}{i}"], np.ones((1, 4)), ids=[f"{tag}{i}"])

    threads = [threading.Thread(target=writer, args=(t,)) for t in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stats = MemoryStore(tmp_path / "s.parquet", 4).stats()
    assert stats == {"rows": 75, "live": 75, "seq": 75}


def test_wrong_dimension_is_a_clear_error(tmp_path):
    store = MemoryStore(tmp_path / "s.parquet", 4)
    with pytest.raises(ValueError, match="has 3 dims, the store has 4"):
        store.add(["a"], np.ones((1, 3)))
    store.add(["a"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="services.embedding_dim"):
        MemoryStore(tmp_path / "s.parquet", 8).stats()
