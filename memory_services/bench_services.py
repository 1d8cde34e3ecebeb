"""Service measurements of ``trainmem bench memory``, all on one embedded Ray cluster:

- retriever QPS and recall@10 through the HTTP service (entries returned) beside FAISS called
  directly on the same index config and data, batch 64, several requests in flight on both sides;
- memory-layer lookup throughput at batch 1024: in-process forward, Serve handle, HTTP; then the
  same through 2 value shards.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .bench_layers import compare
from .config import ConsolidationConfig, HttpConfig, LayerServiceConfig, RetrieverConfig, ServicesConfig
from .embedder import normalize
from .layers.layer_store import LayerChain, LayerStore
from .retriever import Retriever
from .store import MemoryStore


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in clusters of ~4 (what a retriever and a consolidation job both meet)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 4), dim))
    return normalize(centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, dim)))


def _throughput(fn, items: list, workers: int, budget: float) -> float:
    """Best items/s over passes of ``fn`` on every item with ``workers`` in flight (one warm-up pass)."""
    def one_pass() -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, items))

    return len(items) / compare({"pass": one_pass}, budget, 1)["pass"]


def bench_retriever(s: dict, budget: float, cfg: ServicesConfig, url: str, token: str) -> dict:
    from .client import MemoryClient

    dim, n = s["index_dim"], s["index_n"]
    vecs = clustered(n, dim, 1)
    rng = np.random.default_rng(2)
    queries = normalize(vecs[rng.integers(0, n, s["queries"])] + 0.1 * rng.standard_normal((s["queries"], dim)))
    local = Retriever(dim, cfg.retriever)
    local.apply_rows(MemoryStore(cfg.store_path, dim).scan(0))
    index, params = local._index, local._search_params(None)
    batches = [queries[i : i + 64] for i in range(0, len(queries), 64)]
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    direct_qps = 64 * _throughput(lambda b: index.search(b, 10, params=params), batches, 2, budget)
    client = MemoryClient(url, token, timeout_s=120, max_batch=64)
    got: dict[int, list] = {}

    def ask(i: int) -> None:
        got[i] = client.search(batches[i], 10)

    client.search(batches[0], 10)  # warm the replicas
    service_qps = 64 * _throughput(ask, list(range(len(batches))), s["in_flight"], budget)
    ids_qps = 64 * _throughput(lambda i: client.search(batches[i], 10, include=[]), list(range(len(batches))),
                               s["in_flight"], budget)
    ids = [[int(h["id"][1:]) for h in row] for i in range(len(batches)) for row in got[i]]
    recall = float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(ids, exact)]))
    assert all("text" in h for row in got[0] for h in row)  # the service returns entries, not ids
    client.close()
    return {"n": n, "dim": dim, "direct_qps": direct_qps, "service_qps": service_qps, "service_ids_qps": ids_qps,
            "recall_at_10": recall,
            "in_flight": s["in_flight"], "threads": os.cpu_count()}


def bench_lookup(s: dict, budget: float, cfg: ServicesConfig, url: str, token: str, redeploy) -> dict:
    from .client import MemoryClient
    from .serving import LayerClient

    store = MemoryStore(cfg.store_path, cfg.embedding_dim)
    chain = LayerChain.from_json(store.kv()["layer.default"])
    layer = LayerStore(cfg.layer_dir).load_layer(chain).eval()
    d, slots, batch = layer.cfg.d_model, layer.cfg.n_slots, 1024
    xs = [np.random.default_rng(i).standard_normal((batch, d)).astype(np.float32) for i in range(s["lookup_batches"])]

    def inproc():
        with torch.no_grad():
            layer(torch.from_numpy(xs[0]))

    inproc_tok_s = batch / compare({"fwd": inproc}, budget)["fwd"]
    handle = LayerClient(max_rows=batch)
    handle.lookup(xs[0])
    handle_tok_s = batch * _throughput(handle.lookup, xs, s["in_flight"], budget)
    http = MemoryClient(url, token, timeout_s=120, max_batch=batch)
    http.lookup(xs[0])
    http_tok_s = batch * _throughput(lambda x: http.lookup(x, parallel=1), xs, s["in_flight"], budget)
    http.close()
    layer.values.weight.data = layer.values.weight.data[:0]  # free the table before the sharded runs
    sharded = {}
    for by in s["layouts"]:
        redeploy(2, by)
        if (running := _value_shards_running()) != 2:  # measure the new layout, never the previous one
            raise RuntimeError(f"bench memory: redeployed 2 value shards by {by}, but {running} are running")
        handle = LayerClient(max_rows=batch)
        handle.lookup(xs[0])
        sharded[by] = batch * _throughput(handle.lookup, xs, s["in_flight"], budget)
    return {"d": d, "slots": slots, "batch": batch,
            "inproc_tok_s": inproc_tok_s, "handle_tok_s": handle_tok_s, "http_tok_s": http_tok_s,
            "sharded2_handle_tok_s": sharded.get("rows"), "sharded2_columns_handle_tok_s": sharded.get("columns"),
            "in_flight": s["in_flight"]}


def _value_shards_running() -> int:
    from ray import serve

    from .serving import APP_NAME

    deployments = serve.status().applications[APP_NAME].deployments
    return sum(1 for name, d in deployments.items() if name.startswith("ValueShard") and d.status == "HEALTHY")


def run(s: dict, budget: float, workdir: Path, progress) -> dict:
    import ray

    from .serving import serve_app, shutdown_services, start_local_ray

    dim, n = s["index_dim"], s["index_n"]
    store_dir = workdir / "services"
    store = MemoryStore(store_dir, dim)
    vecs = clustered(n, dim, 1)
    for start in range(0, n, 50_000):
        part = vecs[start : start + 50_000]
        store.add([f"text of v{i}" for i in range(start, start + len(part))], part,
                  [{"k": i % 10} for i in range(start, start + len(part))],
                  ids=[f"v{i}" for i in range(start, start + len(part))])
    layer = LayerServiceConfig(d_model=s["lookup_d"], heads=4, n_keys=s["lookup_keys"], topk=32,
                               max_batch_size=4096)
    cfg = ServicesConfig(
        store_path=str(store_dir), embedding_dim=dim,
        # Two HTTP replicas of one FAISS thread each: the fastest layout measured on 2 cores (the HTTP
        # handling of one replica overlaps the search of the other).
        retriever=RetrieverConfig(kind="hnsw", ef_search=128, embedder="none", save_every_s=3600,
                                  replicas=s["replicas"], threads=s["threads"]),
        http=HttpConfig(port=0, max_batch=1024, max_body_bytes=64 << 20),
        consolidation=ConsolidationConfig(schedule="0 0 1 1 *"), memory_layer=layer,
    )
    started = not ray.is_initialized()
    if started:
        start_local_ray(2, logging_level="ERROR")
    try:
        served = serve_app(cfg, schedule=False, timeout_s=600)
        token = (store_dir / "token").read_text().strip()
        retriever = bench_retriever(s, budget, cfg, served.url, token)
        progress()

        def redeploy(shards: int, by: str):
            # In place: serve.run replaces the application and returns once the new layout runs, so
            # Serve's controller and proxy stay up between layouts instead of restarting.
            return serve_app(dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=served.port),
                                                 memory_layer=dataclasses.replace(layer, shards=shards, shard_by=by)),
                             schedule=False, timeout_s=600)

        lookup = bench_lookup(s, budget, cfg, served.url, token, redeploy)
        progress()
    finally:
        shutdown_services()
        if started:
            ray.shutdown()
    return {"retriever": retriever, "lookup": lookup}
