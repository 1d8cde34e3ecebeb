"""trainmem.memory_services: trained memory as cluster services.

Memory layers (product keys, hashed n-grams) and their versioned layer store, the memory store
(an append-only Arrow log), a FAISS retriever, lease-guarded consolidation, and their Ray Serve
deployments, HTTP API and clients.
"""

from trainmem.lazy import lazy_getattr


# Every name loads on first use: a job spec reads ServicesConfig and a trainer builds a GPT without
# importing the store, FAISS, consolidation or Ray Serve (each trainer start paid ~0.1 CPU-s for them).
_WHERE = {
    **dict.fromkeys(("ConsolidationConfig", "EngramConfig", "HttpConfig", "LayerServiceConfig", "ProductKeyConfig",
                     "RetrieverConfig", "ServicesConfig"), "config"),
    **dict.fromkeys(("ConsolidationJob", "ConsolidationResult", "CronScheduler", "Lease", "LeaseHeld", "sources_of"),
                    "consolidation"),
    **dict.fromkeys(("Embedder", "MiniLMEmbedder", "normalize"), "embedder"),
    **dict.fromkeys(("ColumnShardedProductKeyMemory", "HashedNgramMemory", "NgramPrefetcher", "ProductKeyMemory",
                     "RowSparseAdam", "build_optimizers", "memory_layers", "memory_parameters", "product_key_topk",
                     "value_optimizer"), "layers"),
    **dict.fromkeys(("distill", "new_layer", "top1_accuracy"), "layers.distill"),
    **dict.fromkeys(("LayerChain", "LayerStore"), "layers.layer_store"),
    **dict.fromkeys(("Retriever", "StaleIndex"), "retriever"),
    **dict.fromkeys(("Entry", "FilterError", "IdempotencyConflict", "MemoryStore", "StoreCorrupt", "VersionConflict"),
                    "store"),
    # Ray Serve, FastAPI and httpx
    **dict.fromkeys(("serve_app", "shutdown_services", "start_local_ray"), "serving.app"),
    **dict.fromkeys(("MemoryClient", "MemoryServiceError", "MemoryUnavailable"), "client"),
    "LayerClient": "serving.handle_client",
    **dict.fromkeys(("load_run_layer", "init_memory", "maybe_init_memory", "ensure_layer_chain", "plan_memory_init",
                     "layer_sha256"), "layers.from_run"),
}

__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
