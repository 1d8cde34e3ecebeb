"""trainmem.memory_services: trained memory as cluster services.

Memory layers (product keys, hashed n-grams) and their versioned layer store, the memory store
(an append-only Arrow log), a FAISS retriever, lease-guarded consolidation, and their Ray Serve
deployments, HTTP API and clients. Ray Serve / FastAPI parts import lazily (``serve_app``,
``MemoryClient``, ``LayerClient``) so the layers stay light.
"""

from .config import (
    ConsolidationConfig,
    EngramConfig,
    HttpConfig,
    LayerServiceConfig,
    ProductKeyConfig,
    RetrieverConfig,
    ServicesConfig,
)
from .consolidation import ConsolidationJob, ConsolidationResult, CronScheduler, Lease, LeaseHeld, sources_of
from .embedder import Embedder, MiniLMEmbedder, normalize
from .layers import (
    ColumnShardedProductKeyMemory,
    HashedNgramMemory,
    NgramPrefetcher,
    ProductKeyMemory,
    RowSparseAdam,
    build_optimizers,
    memory_layers,
    memory_parameters,
    product_key_topk,
    value_optimizer,
)
from .layers.distill import distill, new_layer, top1_accuracy
from .layers.layer_store import LayerChain, LayerStore
from .retriever import Retriever, StaleIndex
from .store import Entry, FilterError, IdempotencyConflict, MemoryStore, StoreCorrupt, VersionConflict

_LAZY = {
    "serve_app": "serving.app", "shutdown_services": "serving.app",
    "MemoryClient": "client", "MemoryServiceError": "client",
    "LayerClient": "serving.handle_client", "MemoryUnavailable": "client",
    "load_run_layer": "layers.from_run", "init_memory": "layers.from_run", "maybe_init_memory": "layers.from_run",
    "ensure_layer_chain": "layers.from_run", "plan_memory_init": "layers.from_run", "layer_sha256": "layers.from_run",
}

__all__ = [
    "ColumnShardedProductKeyMemory", "ConsolidationConfig", "ConsolidationJob", "ConsolidationResult",
    "CronScheduler", "Embedder", "EngramConfig", "Entry", "FilterError", "HashedNgramMemory", "HttpConfig",
    "IdempotencyConflict", "LayerChain", "LayerServiceConfig", "LayerStore", "Lease", "LeaseHeld", "MemoryStore",
    "MiniLMEmbedder", "NgramPrefetcher", "ProductKeyConfig", "ProductKeyMemory", "Retriever", "RetrieverConfig",
    "RowSparseAdam", "ServicesConfig", "StaleIndex", "StoreCorrupt", "VersionConflict", "build_optimizers",
    "distill", "memory_layers", "memory_parameters", "new_layer", "normalize", "product_key_topk", "sources_of",
    "top1_accuracy", "value_optimizer", *_LAZY,
]


def __getattr__(name: str):
    # Ray Serve, FastAPI and httpx load only when services are used.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
