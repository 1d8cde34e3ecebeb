"""Start the memory services on a Ray cluster with Ray Serve.

``serve_app(cfg)`` deploys: the retriever, the memory-layer lookup (``@serve.batch``), the
consolidation scheduler, and the FastAPI ingress bound to ``cfg.http.host`` (127.0.0.1 by
default). The caller owns ``ray.init``; ``shutdown_services`` removes what this started.
"""

from __future__ import annotations

import os
import socket
import time

import httpx
from ray import serve

from .config import ServicesConfig
from .deployments import ConsolidationBackend, LayerBackend, RetrieverBackend
from .http_api import MemoryApi

APP_NAME = "trainmem-memory"

# Services are I/O-bound glue around FAISS/torch calls; they do not reserve CPUs so they fit
# beside a training job on a small embedded cluster.
_RETRIEVER = serve.deployment(RetrieverBackend, name="Retriever", ray_actor_options={"num_cpus": 0})
_LAYER = serve.deployment(LayerBackend, name="MemoryLayer", ray_actor_options={"num_cpus": 0})
_CONSOLIDATION = serve.deployment(
    ConsolidationBackend, name="Consolidation", ray_actor_options={"num_cpus": 0}, health_check_period_s=10
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_token(cfg: ServicesConfig) -> str:
    """The bearer token from the environment variable the config names ('' when none is set)."""
    if not cfg.http.token_env:
        return ""
    token = os.environ.get(cfg.http.token_env, "")
    if not token:
        raise ValueError(
            f"http.token_env={cfg.http.token_env!r} names an unset or empty environment variable "
            f"(fix: export {cfg.http.token_env}=... or set token_env = '')"
        )
    return token


def serve_app(cfg: ServicesConfig, token: str | None = None, schedule: bool = True, timeout_s: float = 120.0) -> str:
    """Deploy everything; returns the base URL once ``/health`` answers."""
    port = cfg.http.port or free_port(cfg.http.host)
    serve.start(http_options={"host": cfg.http.host, "port": port})
    token = resolve_token(cfg) if token is None else token
    retriever = _RETRIEVER.bind(cfg)
    layer = _LAYER.options(
        max_ongoing_requests=max(100, 2 * cfg.memory_layer.max_batch_size)
    ).bind(cfg) if cfg.memory_layer.enabled else None
    consolidation = _CONSOLIDATION.bind(cfg, schedule)
    app = MemoryApi.bind(
        retriever, layer, consolidation, cfg.http, cfg.embedding_dim, cfg.memory_layer.d_model, token,
        cfg.retriever.embedder != "none",
    )
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.http.host}:{port}"
    _wait_healthy(url, timeout_s)
    return url


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.2)
    raise TimeoutError(f"memory services at {url} did not answer /health within {timeout_s}s ({last})")


def shutdown_services() -> None:
    serve.delete(APP_NAME)
    serve.shutdown()
