"""Retriever: recall@10 against exact search on MiniLM-embedded stdlib docstrings, deletes,
filters, store sync, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from trainmem.memory_services import MemoryStore, Retriever, RetrieverConfig, StaleIndex

CONFIGS = {
    "hnsw": RetrieverConfig(kind="hnsw", embedder="none"),
    "ivf": RetrieverConfig(kind="ivf", nlist=16, nprobe=8, embedder="none"),
}


def _split(docstring_embeddings):
    texts, vecs = docstring_embeddings
    return [f"d{i}" for i in range(1100)], vecs[:1100], vecs[1100:]


def _exact(ids, vecs, queries, k=10):
    flat = Retriever(vecs.shape[1], RetrieverConfig(kind="flat", embedder="none"))
    flat.add(ids, vecs)
    return [[h for h, _ in row] for row in flat.search(queries, k)]


def _recall(got, want) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_recall_at_10_against_exact_search(kind, docstring_embeddings):
    ids, vecs, queries = _split(docstring_embeddings)
    r = Retriever(vecs.shape[1], CONFIGS[kind])
    r.add(ids, vecs)
    assert r._index.is_trained and r._index.ntotal == 1100  # the ANN index answers, not the fallback
    got = [[h for h, _ in row] for row in r.search(queries, 10)]
    assert _recall(got, _exact(ids, vecs, queries)) >= 0.95


def test_a_docstring_finds_itself_by_text(docstring_embeddings):
    texts, vecs = docstring_embeddings
    r = Retriever(vecs.shape[1], RetrieverConfig(kind="hnsw"))  # the bundled MiniLM embeds the queries
    r.add([f"d{i}" for i in range(200)], vecs[:200])
    hits = r.search(r.encode(texts[:20]), k=1)
    assert sum(row[0][0] == f"d{i}" for i, row in enumerate(hits)) >= 19


def test_deleted_entries_are_never_returned_and_compaction_keeps_recall(docstring_embeddings):
    ids, vecs, queries = _split(docstring_embeddings)
    r = Retriever(vecs.shape[1], CONFIGS["hnsw"])
    r.add(ids, vecs)
    exact_before = _exact(ids, vecs, queries)
    doomed = sorted({h for row in exact_before for h in row[:3]})  # the best answers go first
    r.delete(doomed[:100], compact=False)
    assert r._dead.sum() == len(doomed[:100])
    for row in r.search(queries, 10):
        assert not set(h for h, _ in row) & set(doomed[:100])
    r.delete(doomed[100:] + [i for i in ids[:300] if i not in doomed])  # past compact_ratio: rebuilt
    assert not r._dead.any() and len(r) == r._index.ntotal
    gone = set(doomed) | set(ids[:300])
    keep = [j for j, i in enumerate(ids) if i not in gone]
    got = [[h for h, _ in row] for row in r.search(queries, 10)]
    assert not {h for row in got for h in row} & gone
    assert _recall(got, _exact([ids[j] for j in keep], vecs[keep], queries)) >= 0.95


def test_filtered_search_matches_exact_filtered(docstring_embeddings):
    ids, vecs, queries = _split(docstring_embeddings)
    r = Retriever(vecs.shape[1], CONFIGS["hnsw"])
    r.add(ids, vecs, [{"shard": j % 7, "j": j} for j in range(len(ids))], ["a" if j % 2 else "b" for j in range(len(ids))])
    for exact_max in (4096, 0):  # the exact path, then FAISS with an IDSelectorBitmap
        r.exact_filter_max = exact_max
        where = {"shard": {"$in": [3, 4]}, "j": {"$lt": 900}}
        got = [[h for h, _ in row] for row in r.search(queries[:30], 10, where, namespace="a")]
        sel = [j for j in range(len(ids)) if j % 7 in (3, 4) and j < 900 and j % 2]
        want = _exact([ids[j] for j in sel], vecs[sel], queries[:30])
        assert all(int(h[1:]) in set(sel) for row in got for h in row)
        assert _recall(got, want) >= 0.95


def test_save_load_round_trip(tmp_path, docstring_embeddings):
    ids, vecs, queries = _split(docstring_embeddings)
    for kind, cfg in CONFIGS.items():
        r = Retriever(vecs.shape[1], cfg)
        r.add(ids, vecs, [{"i": j} for j in range(len(ids))])
        r.delete(ids[:50], compact=False)
        r.save(tmp_path / kind)
        r.save(tmp_path / kind)  # a second save replaces the first generation
        assert len(list((tmp_path / kind).glob("index-*.faiss"))) == 1
        back = Retriever.load(tmp_path / kind, cfg)
        assert back.search(queries, 10) == r.search(queries, 10)
        assert back.search(queries[:5], 10, {"i": 60}) == r.search(queries[:5], 10, {"i": 60})
        assert len(back) == len(r) == 1050
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Retriever.load(tmp_path / "nothing")


def test_a_saved_index_is_refused_for_another_store_config_or_a_newer_state(tmp_path, docstring_embeddings):
    ids, vecs, _ = _split(docstring_embeddings)
    r = Retriever(vecs.shape[1], CONFIGS["hnsw"])
    r.add(ids[:50], vecs[:50])
    r.watermark = 50
    r.save(tmp_path / "i", store_id="store-a")
    assert len(Retriever.load(tmp_path / "i", CONFIGS["hnsw"], store_id="store-a", store_seq=60)) == 50
    with pytest.raises(StaleIndex, match="store-a"):
        Retriever.load(tmp_path / "i", CONFIGS["hnsw"], store_id="store-b")
    with pytest.raises(StaleIndex, match="hnsw_m=32"):
        Retriever.load(tmp_path / "i", RetrieverConfig(kind="hnsw", hnsw_m=16, embedder="none"))
    with pytest.raises(StaleIndex, match="store is at 10"):
        Retriever.load(tmp_path / "i", CONFIGS["hnsw"], store_id="store-a", store_seq=10)


def test_follows_the_store_through_its_watermark(tmp_path, docstring_embeddings):
    _, vecs = docstring_embeddings
    store = MemoryStore(tmp_path / "s", vecs.shape[1])
    r = Retriever(vecs.shape[1], CONFIGS["hnsw"])
    added = store.add([f"t{i}" for i in range(50)], vecs[:50])
    r.apply_rows(store.scan(r.watermark))
    store.delete([added[0].id])
    store.update(added[1].id, embedding=vecs[60])
    assert r.apply_rows(store.scan(r.watermark)) == 2
    assert added[0].id not in {h for h, _ in r.search(vecs[:1], 50)[0]}
    assert r.search(vecs[60:61], 1)[0][0][0] == added[1].id
    assert len(r) == 49 and r.watermark == store.current_seq()


def test_untrained_ivf_answers_exactly_until_it_can_train(docstring_embeddings):
    ids, vecs, queries = _split(docstring_embeddings)
    r = Retriever(vecs.shape[1], RetrieverConfig(kind="ivf", nlist=64, nprobe=8, embedder="none"))
    r.add(ids[:500], vecs[:500])  # < 39 * nlist: FAISS would train on too few points
    assert not r._index.is_trained
    got = [[h for h, _ in row] for row in r.search(queries, 10)]
    assert got == _exact(ids[:500], vecs[:500], queries)
    r.add(ids[500:], vecs[500:])
    r.add([f"x{i}" for i in range(1500)], vecs[np.arange(1500) % 1100] + 0.01)  # now 2600 >= 39 * 64
    assert r._index.is_trained and r._index.ntotal == 2600
