"""The HTTP API (FastAPI, served as the Ray Serve ingress): memories, search, layer lookups, consolidation.

The ingress reads and writes the memory store itself (its own log-following view: no hop for
CRUD) and holds the retriever (the FAISS index, searched in this process: an actor hop costs more
than a batch-64 search); lookups go to the layer router, consolidation to its deployment. Before anything is parsed the ``Gate`` checks the bearer token and bounds the body.
Errors are ``{"error": "<one line>"}`` with a 4xx status (401 token, 404 unknown id, 409 version
or lease conflict, 413 too large, 422 invalid), 503 + Retry-After when a shard or the store lock
is unavailable (retryable), 500 only for real faults. OpenAPI at /openapi.json, docs at /docs.
"""

# No `from __future__ import annotations`: FastAPI must see real types through serve.ingress.

import asyncio
import base64
import logging
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from ..config import ServicesConfig
from ..embedder import normalize
from ..store import FilterError, IdempotencyConflict, VersionConflict, compile_where
from . import auth
from .deployments import RetrieverBackend
from .schemas import (
    AddRequest,
    DeleteRequest,
    Limits,
    ListRequest,
    LookupRequest,
    SearchRequest,
    UpdateRequest,
    UpsertRequest,
    matrix,
    valid_id,
)

log = logging.getLogger(__name__)

api = FastAPI(
    title="trainmem memory services",
    description="Memories (add, get, list, update, upsert, delete, search), memory-layer lookups, consolidation. "
                "Send `Authorization: Bearer <token>` (see `trainmem serve`'s output for where the token is).",
)
api.add_middleware(auth.Gate)


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


@api.exception_handler(VersionConflict)
async def _conflict(_: Request, exc: VersionConflict) -> JSONResponse:
    return JSONResponse({"error": str(exc), "id": exc.entry_id, "version": exc.have}, 409)


@api.exception_handler(Exception)
async def _fault(_: Request, exc: Exception) -> JSONResponse:
    log.exception("memory services: unexpected error")
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the service log"}, 500)


def _unavailable(message: str) -> HTTPException:
    return HTTPException(503, f"{message} (retryable)", headers={"Retry-After": "1"})


async def _store_call(fn, *args, **kwargs):
    """A store operation off the event loop, with its errors as HTTP answers."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except KeyError as e:
        raise HTTPException(404, f"no entry {e.args[0]!r}") from None
    except IdempotencyConflict as e:
        raise HTTPException(422, str(e)) from None
    except FilterError as e:
        raise HTTPException(422, str(e)) from None
    except TimeoutError as e:
        raise _unavailable(str(e)) from None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class MemoryApi:
    def __init__(self, cfg: ServicesConfig, token: "auth.TokenSource", router, consolidation, layer_dim: int = 0):
        self.cfg, self.dim, self.layer_dim = cfg, cfg.embedding_dim, layer_dim
        auth.configure(auth.read_token(token), cfg.http.max_body_bytes)
        self.limits = Limits(cfg.http)
        self.retriever = RetrieverBackend(cfg)
        self.store = self.retriever.store
        self.router, self.consolidation = router, consolidation
        self.can_embed = cfg.retriever.embedder != "none"

    def __del__(self):  # Serve calls this on a graceful shutdown: the index is saved
        self.retriever.close()

    # -- helpers ---------------------------------------------------------------------------
    async def _vectors(self, texts: list[str], given: list[Optional[list[float]]], what: str) -> np.ndarray:
        """Embeddings for entries: given ones checked, missing ones embedded by the retriever."""
        out = np.zeros((len(texts), self.dim), np.float32)
        missing = []
        for i, vec in enumerate(given):
            if vec is None:
                if not self.can_embed:
                    raise HTTPException(422, f"{what}[{i}].embedding is required (retriever.embedder='none')")
                missing.append(i)
                continue
            out[i] = matrix([vec], None, self.dim, f"{what}[{i}].embedding")[0]
            if not np.linalg.norm(out[i]) > 0:
                raise HTTPException(422, f"{what}[{i}].embedding is all zeros")
        if missing:
            out[missing] = await asyncio.to_thread(self.retriever.embed, [texts[i] for i in missing])
        return normalize(out)

    def _check_entry(self, text: Optional[str], metadata: Optional[dict], what: str) -> None:
        if text is not None:
            self.limits.text(text, f"{what}.text")
        if metadata is not None:
            self.limits.metadata(metadata, f"{what}.metadata")

    # -- routes ----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/entries", status_code=201)
    async def add(self, req: AddRequest, request: Request) -> dict[str, Any]:
        """Add entries; with `idempotency_key` (or an Idempotency-Key header) a retry returns the first result."""
        self.limits.batch(len(req.entries), "entries")
        for i, e in enumerate(req.entries):
            self._check_entry(e.text, e.metadata, f"entries[{i}]")
        ids = [e.id for e in req.entries]
        if any(ids) and (not all(ids) or len(set(ids)) != len(ids)):
            raise HTTPException(422, "ids must be given for all entries or none, and be unique")
        key = req.idempotency_key or request.headers.get("idempotency-key")
        vecs = await self._vectors([e.text for e in req.entries], [e.embedding for e in req.entries], "entries")
        added = await _store_call(
            self.store.add, [e.text for e in req.entries], vecs, [e.metadata for e in req.entries],
            ids if all(ids) else None, [e.namespace for e in req.entries], idempotency_key=key,
        )
        return {"entries": [a.to_json() for a in added]}

    @api.get("/v1/entries/{entry_id}")
    async def get(self, entry_id: str, embedding: bool = False) -> dict[str, Any]:
        entry = await _store_call(self.store.get, entry_id[:200])
        if entry is None:
            raise HTTPException(404, f"no entry {entry_id[:200]!r}")
        return entry.to_json(embedding=embedding)

    @api.get("/v1/entries")
    async def list_get(self, namespace: Optional[str] = None, limit: int = 100, after: Optional[str] = None):
        """A page of entries in creation order (metadata filters: POST /v1/entries/list)."""
        try:
            req = ListRequest(namespace=namespace, limit=limit, after=after)
        except ValidationError as e:
            raise HTTPException(422, f"{e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
        return await self.list_post(req)

    @api.post("/v1/entries/list")
    async def list_post(self, req: ListRequest) -> dict[str, Any]:
        self.limits.page(req.limit)
        self.limits.namespace(req.namespace)
        try:
            page, cursor = await _store_call(self.store.list_entries, req.namespace, req.where, req.limit, req.after)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return {"entries": [e.to_json() for e in page], "next": cursor}

    @api.patch("/v1/entries/{entry_id}")
    async def update(self, entry_id: str, req: UpdateRequest) -> dict[str, Any]:
        """Change fields of an entry only if it is still at `version` (409 otherwise, with the current one)."""
        self._check_entry(req.text, req.metadata, "body")
        emb = None if req.embedding is None else (await self._vectors([""], [req.embedding], "body"))[0]
        if req.embedding is None and req.text is not None and self.can_embed:
            emb = (await self._vectors([req.text], [None], "body"))[0]
        entry = await _store_call(self.store.update, entry_id, text=req.text, embedding=emb, metadata=req.metadata,
                                  namespace=req.namespace, expected_version=req.version)
        return entry.to_json()

    @api.put("/v1/entries/{entry_id}")
    async def upsert(self, entry_id: str, req: UpsertRequest) -> dict[str, Any]:
        """Create or replace an entry under this id (with `version`: only if it is still at that version)."""
        if not valid_id(entry_id):
            raise HTTPException(422, "id: 1..128 letters, digits, '_', '.', ':' or '-'")
        self._check_entry(req.text, req.metadata, "body")
        emb = (await self._vectors([req.text], [req.embedding], "body"))[0]
        entry = await _store_call(self.store.upsert, entry_id, req.text, emb, req.metadata, req.namespace, req.version)
        return entry.to_json()

    @api.delete("/v1/entries/{entry_id}")
    async def delete(self, entry_id: str, version: Optional[int] = None) -> dict[str, Any]:
        (gone,) = await _store_call(self.store.delete, [entry_id[:200]], [version])
        return {"deleted": gone.to_json()}

    @api.post("/v1/entries/delete")
    async def delete_many(self, req: DeleteRequest) -> dict[str, int]:
        self.limits.batch(len(req.ids), "ids")
        gone = await _store_call(self.store.delete, req.ids, None, True)
        return {"deleted": len(gone)}

    @api.post("/v1/search")
    async def search(self, req: SearchRequest) -> dict[str, Any]:
        """Nearest entries (id, score, text, metadata, namespace, version) per query."""
        self.limits.k(req.k)
        self.limits.namespace(req.namespace)
        try:
            compile_where(req.where)
        except FilterError as e:
            raise HTTPException(422, str(e)) from None
        if req.texts is not None:
            if req.queries is not None or req.queries_b64 is not None:
                raise HTTPException(422, "give exactly one of 'queries', 'queries_b64' or 'texts'")
            self.limits.batch(len(req.texts), "texts")
            if not self.can_embed:
                raise HTTPException(422, "texts need an embedder (retriever.embedder='none'): send 'queries' vectors")
            for i, t in enumerate(req.texts):
                self.limits.text(t, f"texts[{i}]")
            q = await asyncio.to_thread(self.retriever.embed, req.texts)
        else:
            q = matrix(req.queries, req.queries_b64, self.dim, "queries")
            self.limits.batch(len(q), "queries")
        results = await self.retriever.search((q, req.k, req.where, req.namespace))
        if req.include is not None:
            keep = {"id", "score", *req.include}
            results = [[{f: v for f, v in hit.items() if f in keep} for hit in row] for row in results]
        return JSONResponse({"results": results})  # plain JSON: skips FastAPI's per-field encoder

    @api.post("/v1/lookup")
    async def lookup(self, req: LookupRequest) -> dict[str, Any]:
        """Memory-layer outputs for input vectors, all from one layer version (named in the answer)."""
        if self.router is None:
            raise HTTPException(404, "the memory-layer service is disabled (services.memory_layer.enabled)")
        x = matrix(req.vectors, req.vectors_b64, self.layer_dim, "vectors")
        self.limits.batch(len(x), "vectors")
        answer = await self.router.lookup.remote(x)
        if "unavailable" in answer:
            raise _unavailable(answer["unavailable"])
        out = answer["out"].astype("<f4")
        if req.b64_out or req.vectors_b64 is not None:
            return {"version": answer["version"], "shape": list(out.shape),
                    "outputs_b64": base64.b64encode(out.tobytes()).decode()}
        return {"version": answer["version"], "outputs": out.tolist()}

    @api.post("/v1/consolidate")
    async def consolidate(self) -> dict[str, Any]:
        result = await self.consolidation.run_now.remote()
        if not result["ran"]:
            return JSONResponse({"error": result["error"], "holder": result["holder"]}, 409)
        return result

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        out = {"store": await asyncio.to_thread(self.retriever.stats),
               "consolidation": await self.consolidation.status.remote()}
        if self.router is not None:
            out["layer"] = await self.router.info.remote()
        return out

