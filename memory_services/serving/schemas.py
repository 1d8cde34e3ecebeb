"""Request bodies of the HTTP API, every string and list bounded.

Static caps here stop absurd inputs at parse time; the configured limits (``[services.http]``:
max_batch, max_text_chars, max_metadata_keys, max_k, max_page) are checked by ``Limits``.
Vectors come as JSON lists or as base64 of little-endian float32 (``*_b64``), which is ~10x
cheaper to parse.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.

import base64
import binascii
import math
import re
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..config import HttpConfig

ID = r"^[A-Za-z0-9_.:\-]{1,128}$"
NAMESPACE = r"^[A-Za-z0-9_.:\-]{1,64}$"
RESERVED = ("consolidated_from", "merged", "variants", "job")
RESERVED_PREFIXES = ("trainmem.", "_")
HARD_LIST = 10_000
HARD_DIM = 8192
HARD_TEXT = 1 << 20
MAX_META_KEY = 128
MAX_META_STR = 1024

Scalar = Union[str, int, float, bool, None]
Vector = list[float]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntryIn(_Body):
    id: Optional[str] = Field(None, pattern=ID, description="client-chosen id (else one is generated)")
    namespace: str = Field("default", pattern=NAMESPACE)
    text: str = Field(min_length=1, max_length=HARD_TEXT)
    embedding: Optional[Vector] = Field(None, max_length=HARD_DIM)
    metadata: dict[str, Scalar] = Field(default_factory=dict)


class AddRequest(_Body):
    entries: list[EntryIn] = Field(min_length=1, max_length=HARD_LIST)
    idempotency_key: Optional[str] = Field(None, pattern=ID, description="a retried add with this key never duplicates")


class UpdateRequest(_Body):
    version: int = Field(ge=0, description="the version the caller read (compare-and-swap)")
    text: Optional[str] = Field(None, min_length=1, max_length=HARD_TEXT)
    namespace: Optional[str] = Field(None, pattern=NAMESPACE)
    embedding: Optional[Vector] = Field(None, max_length=HARD_DIM)
    metadata: Optional[dict[str, Scalar]] = None


class UpsertRequest(_Body):
    text: str = Field(min_length=1, max_length=HARD_TEXT)
    namespace: str = Field("default", pattern=NAMESPACE)
    embedding: Optional[Vector] = Field(None, max_length=HARD_DIM)
    metadata: dict[str, Scalar] = Field(default_factory=dict)
    version: Optional[int] = Field(None, ge=-1, description="expected version (-1: must not exist); none: blind write")


class DeleteRequest(_Body):
    ids: list[str] = Field(min_length=1, max_length=HARD_LIST)


class ListRequest(_Body):
    namespace: Optional[Union[str, list[str]]] = None
    where: Optional[dict[str, Any]] = None
    limit: int = Field(100, ge=1)
    after: Optional[str] = Field(None, max_length=256)


ENTRY_FIELDS = ("namespace", "text", "metadata", "version", "created", "updated")


class SearchRequest(_Body):
    queries: Optional[list[Vector]] = Field(None, max_length=HARD_LIST)
    queries_b64: Optional[str] = Field(None, max_length=64 << 20)
    texts: Optional[list[str]] = Field(None, max_length=HARD_LIST)
    k: int = Field(10, ge=1)
    namespace: Optional[Union[str, list[str]]] = None
    where: Optional[dict[str, Any]] = None
    include: Optional[list[Literal["namespace", "text", "metadata", "version", "created", "updated"]]] = Field(
        None, max_length=6, description="entry fields in each hit besides id and score (default: all)")


class LookupRequest(_Body):
    vectors: Optional[list[Vector]] = Field(None, max_length=HARD_LIST)
    vectors_b64: Optional[str] = Field(None, max_length=64 << 20)
    b64_out: bool = False


def matrix(rows: Optional[list[list[float]]], b64: Optional[str], dim: int, what: str) -> np.ndarray:
    """(n, dim) float32 from JSON rows or base64; 422 naming the field on any mismatch or non-finite value."""
    if (rows is None) == (b64 is None):
        raise HTTPException(422, f"give exactly one of '{what}' and '{what}_b64'")
    if b64 is not None:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"{what}_b64: not valid base64") from None
        if len(raw) % (4 * dim):
            raise HTTPException(422, f"{what}_b64: {len(raw)} bytes are not rows of {dim} float32")
        arr = np.frombuffer(raw, dtype="<f4").reshape(-1, dim).astype(np.float32)
    else:
        bad = next((i for i, r in enumerate(rows) if len(r) != dim), None)
        if bad is not None:
            raise HTTPException(422, f"{what}[{bad}] has {len(rows[bad])} dims, expected {dim}")
        arr = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    if len(arr) == 0:
        raise HTTPException(422, f"{what}: no vectors")
    if not np.isfinite(arr).all():
        raise HTTPException(422, f"{what} contains NaN or infinity")
    return arr


class Limits:
    """The configured bounds, with messages that name the field and the limit."""

    def __init__(self, http: HttpConfig):
        self.http = http

    def batch(self, n: int, what: str) -> None:
        if n > self.http.max_batch:
            raise HTTPException(413, f"{what}: {n} items exceed max_batch={self.http.max_batch}; split the request")

    def text(self, text: str, what: str) -> None:
        if len(text) > self.http.max_text_chars:
            raise HTTPException(422, f"{what} has {len(text)} chars, max {self.http.max_text_chars}")

    def metadata(self, meta: dict[str, Any], what: str) -> None:
        if len(meta) > self.http.max_metadata_keys:
            raise HTTPException(422, f"{what}: {len(meta)} keys exceed max_metadata_keys={self.http.max_metadata_keys}")
        for key, value in meta.items():
            if not key or len(key) > MAX_META_KEY:
                raise HTTPException(422, f"{what}: key {key[:40]!r} must have 1..{MAX_META_KEY} chars")
            if key in RESERVED or key.startswith(RESERVED_PREFIXES):
                raise HTTPException(422, f"{what}.{key}: reserved for trainmem (consolidation provenance); "
                                         "choose another key")
            if isinstance(value, str) and len(value) > MAX_META_STR:
                raise HTTPException(422, f"{what}.{key}: string of {len(value)} chars exceeds {MAX_META_STR}")
            if isinstance(value, float) and not math.isfinite(value):
                raise HTTPException(422, f"{what}.{key}: {value} is not a finite number")

    def k(self, k: int) -> None:
        if k > self.http.max_k:
            raise HTTPException(422, f"k={k} exceeds max_k={self.http.max_k}")

    def page(self, limit: int) -> None:
        if limit > self.http.max_page:
            raise HTTPException(422, f"limit={limit} exceeds max_page={self.http.max_page}")

    def namespace(self, ns: Optional[Union[str, list[str]]]) -> None:
        names = [ns] if isinstance(ns, str) else (ns or [])
        if len(names) > 64 or any(not isinstance(n, str) or not re.fullmatch(NAMESPACE, n) for n in names):
            raise HTTPException(422, "namespace: 1..64 names of letters, digits, '_', '.', ':' or '-'")


def valid_id(entry_id: str) -> bool:
    return bool(re.fullmatch(ID, entry_id))
