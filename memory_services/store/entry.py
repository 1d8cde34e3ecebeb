"""A memory entry as the store keeps it, and the errors its writes raise."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class VersionConflict(RuntimeError):
    """A compare-and-swap write found another version than the caller expected."""

    def __init__(self, entry_id: str, have: int, expected: int | None, message: str):
        super().__init__(message)
        self.entry_id, self.have, self.expected = entry_id, have, expected


class IdempotencyConflict(RuntimeError):
    """An idempotency key came back with a different request than the one it first named."""


@dataclass
class Entry:
    id: str
    text: str | None
    embedding: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)
    namespace: str = "default"
    version: int = 0
    seq: int = 0
    created: float = 0.0
    updated: float = 0.0
    deleted: bool = False

    def to_json(self, embedding: bool = False) -> dict[str, Any]:
        """The entry as the HTTP API returns it."""
        out = {
            "id": self.id, "namespace": self.namespace, "text": self.text, "metadata": self.metadata,
            "version": self.version, "created": self.created, "updated": self.updated,
        }
        if embedding and self.embedding is not None:
            out["embedding"] = [float(v) for v in self.embedding]
        if self.deleted:
            out["deleted"] = True
        return out


def entry_from_row(row: dict[str, Any]) -> Entry:
    emb = row["embedding"]
    return Entry(
        id=row["id"],
        namespace=row["namespace"],
        text=row["text"],
        embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        version=int(row["version"]),
        seq=int(row["seq"]),
        created=float(row["created"]),
        updated=float(row["updated"]),
        deleted=bool(row["deleted"]),
    )
