"""What a process loads decides its start-up: each Serve replica and trainer is a fresh process."""

from __future__ import annotations

import subprocess
import sys


def _loaded(module: str, heavy: tuple[str, ...]) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_an_ingress_replica_loads_no_torch():
    # The HTTP ingress holds the retriever (FAISS); torch belongs to the layer and consolidation replicas.
    assert _loaded("trainmem.memory_services.serving.http_api", ("torch",)) == []
    assert _loaded("trainmem.memory_services.serving.consolidation_backend", ("torch",)) == ["torch"]  # control


def test_a_trainer_loads_no_faiss_or_serve():
    assert _loaded("trainmem.runtime.worker", ("faiss", "ray.serve")) == []
