"""The memory store: versioned entries in an append-only log of Arrow frames (see store.py)."""

from .entry import Entry, IdempotencyConflict, VersionConflict
from .filters import FilterError, compile_where
from .frames import StoreCorrupt, atomic_write_bytes
from .store import DEFAULT_NAMESPACE, MemoryStore, Transaction, embeddings_of

__all__ = [
    "DEFAULT_NAMESPACE", "Entry", "FilterError", "IdempotencyConflict", "MemoryStore", "StoreCorrupt",
    "Transaction", "VersionConflict", "atomic_write_bytes", "compile_where", "embeddings_of",
]
