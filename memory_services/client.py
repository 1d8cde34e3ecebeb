"""Python client of the memory services' HTTP API (every endpoint), with batching and retries."""

from __future__ import annotations

import base64
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import numpy as np


class MemoryServiceError(RuntimeError):
    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body or {}

    @property
    def retryable(self) -> bool:
        return self.status in (502, 503, 504)


class MemoryUnavailable(MemoryServiceError):
    """A part of the service (a value shard, the store lock) is briefly unavailable: retry."""

    def __init__(self, message: str):
        super().__init__(503, message)


def _b64(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode()


class MemoryClient:
    """``retries`` re-sends idempotent requests (reads, searches, lookups, keyed adds) after 503s or
    connection errors, with backoff; other failures raise MemoryServiceError at once."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0, retries: int = 3, max_batch: int = 256):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.retries, self.max_batch = retries, max_batch

    def _call(self, method: str, path: str, body: Any = None, params: dict | None = None,
              idempotent: bool = True) -> Any:
        for attempt in range(self.retries + 1 if idempotent else 1):
            try:
                r = self._http.request(method, path, json=body, params=params)
            except httpx.TransportError as e:
                if attempt >= self.retries or not idempotent:
                    raise MemoryUnavailable(f"{method} {path}: {e}") from None
                time.sleep(0.2 * 2**attempt)
                continue
            if r.status_code < 400:
                return r.json()
            try:
                payload = r.json()
                message = payload.get("error", r.text)
            except ValueError:
                payload, message = {}, r.text
            if r.status_code == 503 and idempotent and attempt < self.retries:
                time.sleep(float(r.headers.get("retry-after", 0.2)) * (attempt + 1))
                continue
            error = MemoryUnavailable(message) if r.status_code == 503 else MemoryServiceError(r.status_code, message, payload)
            raise error
        raise AssertionError("unreachable")

    # -- entries ---------------------------------------------------------------------------
    def add(self, texts: list[str], embeddings: np.ndarray | None = None, metadata: list[dict] | None = None,
            ids: list[str] | None = None, namespace: str = "default", idempotency_key: str | None = None,
            ) -> list[dict[str, Any]]:
        """Add entries (in batches of max_batch, one idempotency key per batch: a retry never duplicates)."""
        out: list[dict[str, Any]] = []
        key = idempotency_key or uuid.uuid4().hex
        for start in range(0, len(texts), self.max_batch):
            entries = []
            for i in range(start, min(start + self.max_batch, len(texts))):
                e: dict[str, Any] = {"text": texts[i], "namespace": namespace,
                                     "metadata": (metadata[i] if metadata else {})}
                if embeddings is not None:
                    e["embedding"] = np.asarray(embeddings[i], dtype=np.float32).tolist()
                if ids is not None:
                    e["id"] = ids[i]
                entries.append(e)
            body = {"entries": entries, "idempotency_key": f"{key}-{start}"}
            out += self._call("POST", "/v1/entries", body)["entries"]
        return out

    def get(self, entry_id: str, embedding: bool = False) -> dict[str, Any]:
        return self._call("GET", f"/v1/entries/{entry_id}", params={"embedding": embedding})

    def list(self, namespace: str | list[str] | None = None, where: dict | None = None, limit: int = 100,
             after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        page = self._call("POST", "/v1/entries/list", {"namespace": namespace, "where": where, "limit": limit,
                                                       "after": after})
        return page["entries"], page["next"]

    def iterate(self, namespace: str | list[str] | None = None, where: dict | None = None,
                page: int = 500) -> Iterator[dict[str, Any]]:
        """Every matching entry, page by page."""
        cursor = None
        while True:
            entries, cursor = self.list(namespace, where, page, cursor)
            yield from entries
            if cursor is None:
                return

    def update(self, entry_id: str, version: int, text: str | None = None, embedding: np.ndarray | None = None,
               metadata: dict | None = None, namespace: str | None = None) -> dict[str, Any]:
        """Compare-and-swap: applied only if the entry is still at ``version`` (else HTTP 409)."""
        body: dict[str, Any] = {"version": version}
        for key, value in (("text", text), ("metadata", metadata), ("namespace", namespace)):
            if value is not None:
                body[key] = value
        if embedding is not None:
            body["embedding"] = np.asarray(embedding, dtype=np.float32).tolist()
        return self._call("PATCH", f"/v1/entries/{entry_id}", body, idempotent=False)

    def upsert(self, entry_id: str, text: str, embedding: np.ndarray | None = None, metadata: dict | None = None,
               namespace: str = "default", version: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "namespace": namespace, "metadata": metadata or {}, "version": version}
        if embedding is not None:
            body["embedding"] = np.asarray(embedding, dtype=np.float32).tolist()
        return self._call("PUT", f"/v1/entries/{entry_id}", body, idempotent=version is None)

    def delete(self, entry_id: str, version: int | None = None) -> dict[str, Any]:
        params = {"version": version} if version is not None else None
        return self._call("DELETE", f"/v1/entries/{entry_id}", params=params, idempotent=False)["deleted"]

    def delete_many(self, ids: list[str]) -> int:
        return sum(self._call("POST", "/v1/entries/delete", {"ids": list(ids[s : s + self.max_batch])})["deleted"]
                   for s in range(0, len(ids), self.max_batch))

    # -- search, layer, consolidation ----------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10, where: dict | None = None,
               namespace: str | list[str] | None = None, include: list[str] | None = None) -> list[list[dict[str, Any]]]:
        """Entries (with score) nearest each query vector; vectors travel as base64 float32. ``include``
        names the entry fields wanted besides id and score (default: all)."""
        q = np.asarray(queries, dtype=np.float32)
        out: list[list[dict[str, Any]]] = []
        for s in range(0, len(q), self.max_batch):
            body = {"queries_b64": _b64(q[s : s + self.max_batch]), "k": k, "where": where, "namespace": namespace,
                    "include": include}
            out += self._call("POST", "/v1/search", body)["results"]
        return out

    def search_texts(self, texts: list[str], k: int = 10, where: dict | None = None,
                     namespace: str | list[str] | None = None) -> list[list[dict[str, Any]]]:
        out: list[list[dict[str, Any]]] = []
        for s in range(0, len(texts), self.max_batch):
            body = {"texts": list(texts[s : s + self.max_batch]), "k": k, "where": where, "namespace": namespace}
            out += self._call("POST", "/v1/search", body)["results"]
        return out

    def lookup(self, vectors: np.ndarray, parallel: int = 4) -> tuple[np.ndarray, list[int]]:
        """Memory-layer outputs; chunks of max_batch go concurrently (the router fuses them). Returns the
        outputs and the layer version each chunk was answered from."""
        x = np.asarray(vectors, dtype=np.float32)
        chunks = [x[s : s + self.max_batch] for s in range(0, len(x), self.max_batch)]

        def one(chunk: np.ndarray) -> tuple[np.ndarray, int]:
            r = self._call("POST", "/v1/lookup", {"vectors_b64": _b64(chunk)})
            out = np.frombuffer(base64.b64decode(r["outputs_b64"]), dtype="<f4").reshape(r["shape"])
            return out, r["version"]

        with ThreadPoolExecutor(max(1, min(parallel, len(chunks)))) as pool:
            parts = list(pool.map(one, chunks))
        return np.concatenate([p for p, _ in parts]), [v for _, v in parts]

    def consolidate(self) -> dict[str, Any]:
        """Run consolidation now; MemoryServiceError 409 (with ``body['holder']``) if one is running."""
        return self._call("POST", "/v1/consolidate", idempotent=False)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/v1/stats")

    def health(self) -> bool:
        return self._call("GET", "/health").get("status") == "ok"

    def close(self) -> None:
        self._http.close()
