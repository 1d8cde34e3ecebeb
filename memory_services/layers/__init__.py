"""Memory layers: product-key memory (exact top-k, active-row training, column sharding), the
hashed n-gram (Engram) memory, row-sparse Adam, distillation, and the versioned layer store."""

from .engram import HashedNgramMemory, NgramPrefetcher
from .optim import RowSparseAdam
from .params import MEMORY_LAYERS, build_optimizers, memory_layers, memory_parameters, value_optimizer
from .product_key import ColumnShardedProductKeyMemory, GatherRows, ProductKeyMemory, product_key_topk

__all__ = [
    "ColumnShardedProductKeyMemory", "GatherRows", "HashedNgramMemory", "MEMORY_LAYERS", "NgramPrefetcher",
    "ProductKeyMemory", "RowSparseAdam", "build_optimizers", "memory_layers", "memory_parameters",
    "product_key_topk", "value_optimizer",
]
