"""Layer lookups from a job on the same Ray cluster: through a Serve handle, arrays via the object store."""

from __future__ import annotations

import numpy as np
from ray import serve

from ..client import MemoryUnavailable
from .app import APP_NAME, ROUTER


class LayerClient:
    """``lookup(x)`` sends chunks of ``max_rows`` concurrently (the router fuses them in its batches);
    all chunks of one call are answered from the same layer version (lagging chunks are re-asked)."""

    def __init__(self, app_name: str = APP_NAME, max_rows: int = 1024, timeout_s: float = 60.0):
        self.handle = serve.get_deployment_handle(ROUTER, app_name)
        self.max_rows, self.timeout_s = max_rows, timeout_s

    def _ask(self, chunks: list[np.ndarray]) -> list[dict]:
        responses = [self.handle.lookup.remote(c) for c in chunks]
        answers = [r.result(timeout_s=self.timeout_s) for r in responses]
        bad = next((a for a in answers if "unavailable" in a), None)
        if bad is not None:
            raise MemoryUnavailable(bad["unavailable"])
        return answers

    def lookup(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """(outputs, version) for ``x`` (N, d_model) float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        chunks = [x[s : s + self.max_rows] for s in range(0, len(x), self.max_rows)]
        answers = self._ask(chunks)
        for _ in range(3):
            newest = max(a["version"] for a in answers)
            stale = [i for i, a in enumerate(answers) if a["version"] != newest]
            if not stale:
                return np.concatenate([a["out"] for a in answers]), newest
            for i, a in zip(stale, self._ask([chunks[i] for i in stale])):
                answers[i] = a
        raise MemoryUnavailable("the layer version kept changing during this lookup; retry")
