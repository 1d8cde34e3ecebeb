"""The services through Ray Serve and HTTP: client round trips, batched layer lookups, and bad
requests answered 4xx with a message while the store stays unchanged. One Serve instance for
the module (its start-up costs seconds)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
import torch

from trainmem.memory_services import (
    ConsolidationConfig,
    HttpConfig,
    LayerServiceConfig,
    MemoryClient,
    MemoryServiceError,
    MemoryStore,
    RetrieverConfig,
    ServicesConfig,
    new_layer,
    serve_app,
    shutdown_services,
)

from memsvc_data import clustered, representation

DIM = 16
TOKEN = "test-token-7f3a"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    cfg = ServicesConfig(
        store_path=str(tmp_path_factory.mktemp("svc") / "store.parquet"),
        embedding_dim=DIM,
        retriever=RetrieverConfig(kind="hnsw", embedder="none"),
        consolidation=ConsolidationConfig(schedule="0 0 1 1 *"),  # only on demand in these tests
        http=HttpConfig(port=0, max_batch=8, max_text_chars=100, max_k=20),
        memory_layer=LayerServiceConfig(d_model=DIM, n_keys=16, topk=4, max_batch_size=16),
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        url = serve_app(cfg, token=TOKEN, timeout_s=180)
        yield cfg, url
    finally:
        shutdown_services()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(services):
    c = MemoryClient(services[1], token=TOKEN)
    yield c
    c.close()


def test_add_search_delete_consolidate_round_trip(services, client):
    cfg, _ = services
    texts, vecs, groups = clustered(n_clusters=4, n_single=6, dim=DIM, seed=1)
    ids = []
    for start in range(0, len(texts), 8):  # max_batch=8
        ids += client.add(texts[start : start + 8], vecs[start : start + 8], [{"g": g} for g in groups[start : start + 8]])
    hits = client.search(vecs[:3], k=1)
    assert [h[0][0] for h in hits] == ids[:3]
    assert all(ids.index(h) in {i for i, g in enumerate(groups) if g == 2}
               for h, _ in client.search(vecs[:1], k=5, where={"g": 2})[0])
    assert client.delete([ids[-1], "no-such-id"]) == 1
    assert ids[-1] not in {h for h, _ in client.search(vecs[-1:], k=20)[0]}
    result = client.consolidate()
    assert result["clusters"] == 4
    store = MemoryStore(cfg.store_path, DIM)
    assert representation(store) == {i: 1 for i in ids[:-1]}
    # The retriever follows the store: merged members are gone, consolidated entries answer.
    found = {h for row in client.search(vecs[:8], k=3) for h, _ in row}
    assert found.isdisjoint(result["consolidated_ids"]) is False
    assert not found & {m for c in result["consolidated_ids"] for m in store.get(c).metadata["merged"]}
    assert client.stats()["store"]["indexed"] == store.stats()["live"]


def test_layer_lookups_are_batched_and_equal_the_layer(services, client):
    cfg, _ = services
    layer = new_layer(cfg.memory_layer.layer_config())  # what the service starts from (no distilled file yet)
    x = np.random.default_rng(0).standard_normal((24, DIM)).astype(np.float32)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests are fused by @serve.batch
        outs = list(pool.map(lambda i: client.lookup(x[i : i + 3]), range(0, 24, 3)))
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-4, atol=1e-5)


BAD = [
    ("malformed JSON", "/v1/entries", b'{"entries": [', 400, "malformed JSON"),
    ("wrong embedding dims", "/v1/entries", {"entries": [{"text": "x", "embedding": [1.0, 2.0]}]}, 422, "expected 16"),
    ("wrong query dims", "/v1/search", {"queries": [[1.0] * 5]}, 422, "expected 16"),
    ("oversized batch", "/v1/entries", {"entries": [{"text": "x", "embedding": [1.0] * DIM}] * 9}, 413, "max_batch=8"),
    ("oversized search", "/v1/search", {"queries": [[1.0] * DIM] * 9}, 413, "max_batch=8"),
    ("NaN embedding", "/v1/entries", b'{"entries": [{"text": "x", "embedding": [NaN' + b', 1.0' * (DIM - 1) + b"]}]}", 422, "NaN"),
    ("unknown field", "/v1/entries", {"entries": [{"text": "x", "embedding": [1.0] * DIM, "oops": 1}]}, 422, "oops"),
    ("wrong type", "/v1/entries", {"entries": [{"text": 5}]}, 422, "text"),
    ("empty batch", "/v1/entries", {"entries": []}, 422, "entries"),
    ("text too long", "/v1/entries", {"entries": [{"text": "x" * 101, "embedding": [1.0] * DIM}]}, 422, "max 100"),
    ("k too large", "/v1/search", {"queries": [[1.0] * DIM], "k": 21}, 422, "max_k=20"),
    ("both queries and texts", "/v1/search", {"queries": [[1.0] * DIM], "texts": ["a"]}, 422, "exactly one"),
    ("bad id", "/v1/entries", {"entries": [{"id": "../etc", "text": "x", "embedding": [1.0] * DIM}]}, 422, "id"),
    ("zero embedding", "/v1/entries", {"entries": [{"text": "x", "embedding": [0.0] * DIM}]}, 422, "zeros"),
    ("wrong lookup dims", "/v1/lookup", {"vectors": [[1.0] * 3]}, 422, "expected 16"),
    ("delete nothing", "/v1/entries/delete", {"ids": []}, 422, "ids"),
    ("text without embedder", "/v1/entries", {"entries": [{"text": "x"}]}, 422, "embedding is required"),
    ("search texts without embedder", "/v1/search", {"texts": ["x"]}, 422, "need an embedder"),
]


@pytest.mark.parametrize("name,path,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_change_nothing(services, name, path, body, status, needle):
    cfg, url = services
    before = MemoryStore(cfg.store_path, DIM).stats()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    assert "\n" not in r.json()["error"]
    assert MemoryStore(cfg.store_path, DIM).stats() == before


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer"])
def test_bad_token_is_401_before_anything_is_read(services, auth):
    cfg, url = services
    before = MemoryStore(cfg.store_path, DIM).stats()
    headers = {"Authorization": auth} if auth else {}
    good_body = {"entries": [{"text": "x", "embedding": [1.0] * DIM}]}
    for path, body in (("/v1/entries", json.dumps(good_body).encode()), ("/v1/entries", b"{broken")):
        r = httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert httpx.get(url + "/v1/stats", headers=headers, timeout=30).status_code == 401
    assert MemoryStore(cfg.store_path, DIM).stats() == before


def test_duplicate_id_is_409_and_client_raises(client):
    client.add(["first"], np.ones((1, DIM)), ids=["fixed-id"])
    with pytest.raises(MemoryServiceError) as e:
        client.add(["second"], np.ones((1, DIM)), ids=["fixed-id"])
    assert e.value.status == 409
