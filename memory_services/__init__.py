"""trainmem.memory_services: trained memory as cluster services.

Memory layers (product keys, hashed n-grams), an Arrow/Parquet memory store, a FAISS retriever,
exactly-once consolidation jobs, and their Ray Serve deployments, HTTP API and client.
Ray Serve / FastAPI parts import lazily (``serve_app``, ``MemoryClient``) so layers stay light.
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
from .consolidation import ConsolidationJob, ConsolidationResult, CronScheduler, sources_of
from .distill import distill, load_layer, new_layer, save_layer, top1_accuracy
from .embedder import Embedder, MiniLMEmbedder, normalize
from .engram import HashedNgramMemory, NgramPrefetcher
from .optim import RowSparseAdam
from .product_key import (
    ColumnShardedProductKeyMemory,
    ProductKeyMemory,
    build_optimizers,
    memory_parameters,
    product_key_topk,
    value_optimizer,
)
from .retriever import Retriever
from .store import Entry, MemoryStore, VersionConflict

__all__ = [
    "ColumnShardedProductKeyMemory",
    "ConsolidationConfig",
    "ConsolidationJob",
    "ConsolidationResult",
    "CronScheduler",
    "Embedder",
    "EngramConfig",
    "Entry",
    "HashedNgramMemory",
    "HttpConfig",
    "LayerServiceConfig",
    "MemoryClient",
    "MemoryServiceError",
    "MemoryStore",
    "MiniLMEmbedder",
    "NgramPrefetcher",
    "ProductKeyConfig",
    "ProductKeyMemory",
    "Retriever",
    "RowSparseAdam",
    "RetrieverConfig",
    "ServicesConfig",
    "VersionConflict",
    "build_optimizers",
    "distill",
    "load_layer",
    "memory_parameters",
    "new_layer",
    "normalize",
    "product_key_topk",
    "save_layer",
    "serve_app",
    "shutdown_services",
    "sources_of",
    "top1_accuracy",
    "value_optimizer",
]


def __getattr__(name: str):
    # Ray Serve and httpx load only when services are used.
    if name in ("serve_app", "shutdown_services"):
        from . import serve

        return getattr(serve, name)
    if name in ("MemoryClient", "MemoryServiceError"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
