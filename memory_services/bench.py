"""``trainmem bench memory [--json] [--quick]``: memory services beside their anchors, one run.

1. Product-key forward (fp32 and bf16) and forward+backward vs lucidrains' ``product-key-memory``.
2. Value step at ~1M slots: active rows + fused row Adam vs a dense gradient + torch's fused Adam.
3. One small write with 1M entries stored: our log vs the old whole-file Parquet rewrite vs Lance.
4. Retriever QPS and recall@10 through the HTTP service vs FAISS directly (batch 64).
5. Memory-layer lookups at batch 1024: in-process vs Serve handle vs HTTP, and 2 shards (by rows, by columns;
   --quick: columns, the default) vs 1.
6. Consolidation throughput (entries/s) on near-duplicate clusters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import bench_layers, bench_services, bench_store
from .config import ConsolidationConfig
from .consolidation import ConsolidationJob
from .embedder import normalize
from .store import MemoryStore

SIZES = {
    "full": dict(d=512, n_keys=512, topk=32, heads=4, half=128, tokens=1024, big_keys=1024, big_v=256,
                 store_n=1_000_000, index_n=100_000, index_dim=64, queries=2048, in_flight=8, replicas=2, threads=1,
                 lookup_d=512, lookup_keys=512, lookup_batches=8, cons_n=20_000, layouts=("rows", "columns")),
    "quick": dict(d=64, n_keys=64, topk=8, heads=2, half=32, tokens=128, big_keys=128, big_v=32,
                  store_n=20_000, index_n=2_000, index_dim=32, queries=256, in_flight=2, replicas=1, threads=0,
                  lookup_d=32, lookup_keys=32, lookup_batches=4, cons_n=1_000,
                  layouts=("columns",)),  # the default layout: each redeploy restarts the app (~15 CPU-s)
}


def bench_consolidation(s: dict, workdir: Path) -> dict:
    n, dim = s["cons_n"], 32
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((n // 4, dim))
    vecs = normalize(centres[np.arange(n) % len(centres)] + 0.05 * rng.standard_normal((n, dim)))
    store = MemoryStore(workdir / "consolidation", dim)
    store.add([f"memory {i % len(centres)} variant {i}" for i in range(n)], vecs)
    t0 = time.perf_counter()
    result = ConsolidationJob(store, ConsolidationConfig(similarity=0.9)).run_once()
    seconds = time.perf_counter() - t0
    return {"entries": n, "clusters": result.clusters, "seconds": seconds, "entries_per_s": n / seconds}


def _ratio(ours: float | None, anchor: float) -> float | None:
    return None if ours is None else ours / anchor


def run(quick: bool, budget: float, console: Console, workdir: str | None = None) -> dict:
    s = SIZES["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="trainmem-bench-memory-", dir=workdir) as tmp, Progress(
        console=console, transient=True
    ) as bar:
        task = bar.add_task("memory benchmark", total=7)
        step = lambda: bar.advance(task)  # noqa: E731
        torch.set_num_threads(max(1, torch.get_num_threads()))
        pkm = bench_layers.bench_pkm(s, budget)
        step()
        sd = bench_layers.bench_sparse_dense(s, budget)
        step()
        store = bench_store.run(s["store_n"], Path(tmp), writes=20 if not quick else 5, rewrites=3 if not quick else 2)
        step()
        services = bench_services.run(s, budget, Path(tmp), step)
        cons = bench_consolidation(s, Path(tmp))
        step()
    ret, look = services["retriever"], services["lookup"]
    return {
        "size": "quick" if quick else "full",
        "pkm": pkm, "sparse_dense": sd, "store": store, "retriever": ret, "lookup": look, "consolidation": cons,
        "pkm_fwd_speedup": pkm["ours"]["fwd_tok_s"] / pkm["pkm"]["fwd_tok_s"],
        "pkm_fwd_speedup_bf16": pkm["ours"]["fwd_bf16_tok_s"] / pkm["pkm"]["fwd_bf16_tok_s"],
        "pkm_bf16_anchor_precision": pkm["pkm_bf16_precision"],
        "pkm_fwdbwd_speedup": pkm["ours"]["fwdbwd_tok_s"] / pkm["pkm"]["fwdbwd_tok_s"],
        "sparse_vs_dense_step": sd["dense_step_s"] / sd["sparse_step_s"],
        "write_speedup_1m": store["rewrite"]["write_ms"] / store["ours"]["write_ms"],
        "write_vs_lance_cas": (store["lance"].get("cas_write_ms", float("nan")) / store["ours"]["update_cas_ms"]),
        "retriever_qps_ratio": ret["service_qps"] / ret["direct_qps"],
        "retriever_ids_qps_ratio": ret["service_ids_qps"] / ret["direct_qps"],
        "recall_at_10": ret["recall_at_10"],
        "lookup_handle_ratio": look["handle_tok_s"] / look["inproc_tok_s"],
        "lookup_http_ratio": look["http_tok_s"] / look["inproc_tok_s"],
        "lookup_sharded_ratio": _ratio(look["sharded2_handle_tok_s"], look["handle_tok_s"]),
        "lookup_sharded_columns_ratio": _ratio(look["sharded2_columns_handle_tok_s"], look["handle_tok_s"]),
        "consolidation_entries_per_s": cons["entries_per_s"],
    }


def _table(r: dict) -> Table:
    t = Table(title=f"trainmem bench memory ({r['size']})")
    for col in ("measure", "trainmem", "anchor", "ratio", "target"):
        t.add_column(col)
    p, sd, st, ret, lk = r["pkm"], r["sparse_dense"], r["store"], r["retriever"], r["lookup"]
    t.add_row("PKM forward tok/s (fp32)", f"{p['ours']['fwd_tok_s']:,.0f}", f"{p['pkm']['fwd_tok_s']:,.0f} (product-key-memory)",
              f"{r['pkm_fwd_speedup']:.2f}x", ">= 1.5x")
    t.add_row("PKM forward tok/s (bf16)", f"{p['ours']['fwd_bf16_tok_s']:,.0f}",
              f"{p['pkm']['fwd_bf16_tok_s']:,.0f} ({r['pkm_bf16_anchor_precision']})", f"{r['pkm_fwd_speedup_bf16']:.2f}x", ">= 2.5x")
    t.add_row("PKM fwd+bwd tok/s", f"{p['ours']['fwdbwd_tok_s']:,.0f}", f"{p['pkm']['fwdbwd_tok_s']:,.0f}",
              f"{r['pkm_fwdbwd_speedup']:.2f}x", "")
    t.add_row(f"value step s ({sd['slots']:,} x {sd['cols']})", f"{sd['sparse_step_s']:.4f} (active rows)",
              f"{sd['dense_step_s']:.4f} (dense, fused Adam)", f"{r['sparse_vs_dense_step']:.1f}x", ">= 5x")
    t.add_row(f"one write, {st['entries']:,} stored (ms)", f"{st['ours']['write_ms']:.2f} (log + fdatasync)",
              f"{st['rewrite']['write_ms']:,.0f} (whole-file rewrite)", f"{r['write_speedup_1m']:,.0f}x", ">= 20x")
    lance = st["lance"]
    if "error" not in lance:
        t.add_row("  CAS update vs Lance (ms)", f"{st['ours']['update_cas_ms']:.2f}",
                  f"{lance['cas_write_ms']:.1f} (get {lance['get_ms']:.1f} + merge_insert {lance['merge_insert_ms']:.1f}; "
                  f"append {lance['append_ms']:.1f}, no fsync)", f"{r['write_vs_lance_cas']:.1f}x", "")
    t.add_row(f"retriever QPS, batch 64 ({ret['n']:,}x{ret['dim']})", f"{ret['service_qps']:,.0f} (HTTP, entries)",
              f"{ret['direct_qps']:,.0f} (FAISS direct)", f"{r['retriever_qps_ratio']:.2f}x", ">= 0.8x")
    t.add_row("  ids and scores only (include=[])", f"{ret['service_ids_qps']:,.0f}", "",
              f"{r['retriever_ids_qps_ratio']:.2f}x", "")
    t.add_row("recall@10 via service", f"{ret['recall_at_10']:.3f}", "1.0 (exact)", "", ">= 0.95")
    t.add_row(f"lookup tok/s, batch 1024 ({lk['slots']:,} slots)", f"{lk['handle_tok_s']:,.0f} (Serve handle)",
              f"{lk['inproc_tok_s']:,.0f} (in-process)", f"{r['lookup_handle_ratio']:.2f}x", ">= 0.7x")
    t.add_row("  through HTTP", f"{lk['http_tok_s']:,.0f}", "", f"{r['lookup_http_ratio']:.2f}x", ">= 0.3x")
    for by, tok_s, ratio in (("rows", lk["sharded2_handle_tok_s"], r["lookup_sharded_ratio"]),
                             ("columns", lk["sharded2_columns_handle_tok_s"], r["lookup_sharded_columns_ratio"])):
        t.add_row(f"  2 value shards by {by} vs 1", "not measured (--quick)" if tok_s is None else f"{tok_s:,.0f}",
                  f"{lk['handle_tok_s']:,.0f}", "-" if ratio is None else f"{ratio:.2f}x", "as measured")
    t.add_row("consolidation entries/s", f"{r['consolidation_entries_per_s']:,.0f}", "", "", "")
    return t


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trainmem bench memory")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="small sizes, one sharded layout (seconds, for tests)")
    p.add_argument("--seconds", type=float, default=None, help="timing budget per measurement")
    p.add_argument("--workdir", default=None, help="where the temporary stores go (default: the system temp dir)")
    args = p.parse_args(argv)
    budget = args.seconds if args.seconds is not None else (0.3 if args.quick else 3.0)
    console = Console(stderr=args.json)
    result = run(args.quick, budget, console, args.workdir)
    console.print(_table(result))
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
