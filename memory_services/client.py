"""Python client of the memory services' HTTP API."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np


class MemoryServiceError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class MemoryClient:
    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self._http.request(method, path, json=body)
        if r.status_code >= 400:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            raise MemoryServiceError(r.status_code, message)
        return r.json()

    def search(self, queries: np.ndarray, k: int = 10, where: dict | None = None) -> list[list[tuple[str, float]]]:
        body = {"queries": np.asarray(queries, dtype=np.float32).tolist(), "k": k, "where": where}
        return [[(h["id"], h["score"]) for h in row] for row in self._call("POST", "/v1/search", body)["results"]]

    def search_texts(self, texts: list[str], k: int = 10, where: dict | None = None) -> list[list[tuple[str, float]]]:
        body = {"texts": list(texts), "k": k, "where": where}
        return [[(h["id"], h["score"]) for h in row] for row in self._call("POST", "/v1/search", body)["results"]]

    def add(
        self,
        texts: list[str],
        embeddings: np.ndarray | None = None,
        metadata: list[dict] | None = None,
        ids: list[str] | None = None,
    ) -> list[str]:
        entries = []
        for i, text in enumerate(texts):
            e: dict[str, Any] = {"text": text, "metadata": (metadata or [{}] * len(texts))[i]}
            if embeddings is not None:
                e["embedding"] = np.asarray(embeddings[i], dtype=np.float32).tolist()
            if ids is not None:
                e["id"] = ids[i]
            entries.append(e)
        return self._call("POST", "/v1/entries", {"entries": entries})["ids"]

    def delete(self, ids: list[str]) -> int:
        return self._call("POST", "/v1/entries/delete", {"ids": list(ids)})["deleted"]

    def lookup(self, vectors: np.ndarray) -> np.ndarray:
        body = {"vectors": np.asarray(vectors, dtype=np.float32).tolist()}
        return np.asarray(self._call("POST", "/v1/lookup", body)["outputs"], dtype=np.float32)

    def consolidate(self) -> dict[str, Any]:
        return self._call("POST", "/v1/consolidate")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/v1/stats")

    def close(self) -> None:
        self._http.close()
