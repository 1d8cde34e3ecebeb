"""The HTTP API (FastAPI, served as the Ray Serve ingress).

Every request is validated before anything is touched: JSON syntax (400), schema and
dimensions (422), batch size (413), bearer token (401). Errors are ``{"error": "<one line>"}``.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.

import math
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException

from . import auth
from .config import HttpConfig

Scalar = str | int | float | bool


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[list[float]] | None = None
    texts: list[str] | None = None
    k: int = Field(10, ge=1)
    where: dict[str, Scalar] | None = None


class EntryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")
    text: str = Field(min_length=1)
    embedding: list[float] | None = None
    metadata: dict[str, Scalar | None] = Field(default_factory=dict)


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: list[EntryIn] = Field(min_length=1)


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1)


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vectors: list[list[float]] = Field(min_length=1)


api = FastAPI(title="trainmem memory services", docs_url=None, redoc_url=None)
api.middleware("http")(auth.require_token)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return JSONResponse({"error": f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}"}, 400)
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    return JSONResponse({"error": f"{where}: {err['msg']}"}, 422)


@api.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))


def _matrix(rows: list[list[float]], dim: int, what: str) -> np.ndarray:
    bad = next((i for i, r in enumerate(rows) if len(r) != dim), None)
    if bad is not None:
        raise HTTPException(422, f"{what}[{bad}] has {len(rows[bad])} dims, expected {dim}")
    arr = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    if not np.isfinite(arr).all():
        raise HTTPException(422, f"{what} contains NaN or infinity")
    return arr


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(api)
class MemoryApi:
    def __init__(
        self, retriever, layer, consolidation, http: HttpConfig, dim: int, layer_dim: int, token: str = "",
        can_embed: bool = True,
    ):
        self.retriever, self.layer, self.consolidation = retriever, layer, consolidation
        self.http, self.dim, self.layer_dim, self.can_embed = http, dim, layer_dim, can_embed
        auth.set_token(token)

    def _batch(self, n: int, what: str) -> None:
        if n > self.http.max_batch:
            raise HTTPException(413, f"{what}: {n} items exceed max_batch={self.http.max_batch}; split the request")

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/search")
    async def search(self, req: SearchRequest) -> dict[str, Any]:
        if (req.queries is None) == (req.texts is None):
            raise HTTPException(422, "give exactly one of 'queries' (vectors) or 'texts'")
        if req.k > self.http.max_k:
            raise HTTPException(422, f"k={req.k} exceeds max_k={self.http.max_k}")
        if req.queries is not None:
            self._batch(len(req.queries), "queries")
            hits = await self.retriever.search.remote(_matrix(req.queries, self.dim, "queries"), req.k, req.where)
        else:
            self._batch(len(req.texts), "texts")
            if not self.can_embed:
                raise HTTPException(422, "texts need an embedder (retriever.embedder='none'): send 'queries' vectors")
            hits = await self.retriever.search_texts.remote(req.texts, req.k, req.where)
        return {"results": [[{"id": i, "score": s} for i, s in row] for row in hits]}

    @api.post("/v1/entries")
    async def add(self, req: AddRequest) -> dict[str, Any]:
        self._batch(len(req.entries), "entries")
        entries = []
        for i, e in enumerate(req.entries):
            if len(e.text) > self.http.max_text_chars:
                raise HTTPException(422, f"entries[{i}].text has {len(e.text)} chars, max {self.http.max_text_chars}")
            if e.embedding is None and not self.can_embed:
                raise HTTPException(422, f"entries[{i}].embedding is required (retriever.embedder='none')")
            emb = None if e.embedding is None else _matrix([e.embedding], self.dim, f"entries[{i}].embedding")[0]
            if emb is not None and not np.linalg.norm(emb) > 0:
                raise HTTPException(422, f"entries[{i}].embedding is all zeros")
            entries.append({"id": e.id, "text": e.text, "embedding": emb, "metadata": e.metadata})
        ids = [e["id"] for e in entries]
        if any(ids) and (not all(ids) or len(set(ids)) != len(ids)):
            raise HTTPException(422, "ids must be given for all entries or none, and be unique")
        try:
            return {"ids": await self.retriever.add.remote(entries)}
        except Exception as e:  # a CAS conflict (id exists) is the caller's error
            if "VersionConflict" in repr(e):
                raise HTTPException(409, "an entry with that id already exists") from None
            raise

    @api.post("/v1/entries/delete")
    async def delete(self, req: DeleteRequest) -> dict[str, int]:
        self._batch(len(req.ids), "ids")
        return {"deleted": await self.retriever.delete.remote(req.ids)}

    @api.post("/v1/lookup")
    async def lookup(self, req: LookupRequest) -> dict[str, Any]:
        self._batch(len(req.vectors), "vectors")
        if self.layer is None:
            raise HTTPException(404, "the memory-layer service is disabled (services.memory_layer.enabled)")
        out = await self.layer.lookup.remote(_matrix(req.vectors, self.layer_dim, "vectors"))
        return {"outputs": [[round(float(v), 7) if math.isfinite(v) else 0.0 for v in row] for row in out]}

    @api.post("/v1/consolidate")
    async def consolidate(self) -> dict[str, Any]:
        return await self.consolidation.run_now.remote()

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        return {
            "store": await self.retriever.stats.remote(),
            "consolidation": await self.consolidation.status.remote(),
        }
