"""Start the memory services on a Ray cluster with Ray Serve.

``serve_app(cfg)`` sets up the served layer's chain (from a run, or fresh), resolves where the
bearer token lives, and deploys: the FastAPI ingress holding the retriever (``retriever.replicas``
replicas, bound to ``cfg.http.host``, 127.0.0.1 by default), the value shards and the layer
router, and the consolidation scheduler. The caller owns ``ray.init`` (``start_local_ray`` starts an
embedded cluster for the services); ``shutdown_services`` removes what this started.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import httpx
import ray
from ray import serve

from ..config import ServicesConfig
from ..layers.from_run import ensure_layer_chain
from ..layers.layer_store import LayerStore
from ..store import MemoryStore
from .auth import TokenSource, token_source
from .consolidation_backend import ConsolidationBackend
from .http_api import MemoryApi
from .layer_service import LayerRouter, ValueShard

APP_NAME = "trainmem-memory"
ROUTER = "MemoryRouter"

# Replicas reserve no CPUs: glue around FAISS/torch calls that fits beside a training job. Their OpenMP
# threads sleep between calls instead of spinning, leaving the cores to the proxy and other replicas;
# libgomp reads this once, when torch or FAISS loads it, so it must be in the replica's environment.
REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_ENV_INHERITED_BY: str | None = None  # the GCS address of the cluster start_local_ray started


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """Start an embedded cluster on 127.0.0.1 whose processes inherit :data:`REPLICA_ENV` (unless set).

    Replicas on it need no Ray ``runtime_env``, which costs each replica a set-up process and a worker of
    its own (measured: ~9 CPU-s over the deploys of ``bench memory --quick``); clusters joined by address get one.
    """
    global _ENV_INHERITED_BY
    for key, value in REPLICA_ENV.items():
        os.environ.setdefault(key, value)  # a value the user exported is theirs to keep
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
    _ENV_INHERITED_BY = ray.get_runtime_context().gcs_address


def _replica_options() -> dict:
    if _ENV_INHERITED_BY is not None and _ENV_INHERITED_BY == ray.get_runtime_context().gcs_address:
        return {"num_cpus": 0}
    return {"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}}


@dataclass
class Served:
    url: str
    token: str
    """Where the token is (a file path or an environment variable), never the token."""
    layer_version: int
    layer_origin: dict
    port: int
    """The HTTP port Serve's proxy listens on; a redeploy that keeps it replaces the app in place."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_app(cfg: ServicesConfig, schedule: bool = True, timeout_s: float = 180.0,
              token: TokenSource | None = None) -> Served:
    """Deploy everything; returns once ``/health`` answers. ValueError (naming the key) on a bad setup."""
    store = MemoryStore(cfg.store_path, cfg.embedding_dim)
    note = ""
    if token is None:
        token, note = token_source(cfg.http, cfg.store_dir)
    layer_dim, version, origin = 0, 0, {}
    if cfg.memory_layer.enabled:
        chain = ensure_layer_chain(store, cfg)
        layer_cfg, origin = LayerStore(cfg.layer_dir).config(chain)
        layer_dim, version = layer_cfg.d_model, chain.version
        if cfg.consolidation.distill and layer_dim != cfg.embedding_dim:
            raise ValueError(f"embedding_dim={cfg.embedding_dim} must equal the served layer's d_model={layer_dim} "
                             "when consolidation.distill is on (fix: embedding_dim, or distill = false)")
    port = cfg.http.port or free_port(cfg.http.host)
    serve.start(http_options={"host": cfg.http.host, "port": port})
    cpu0 = _replica_options()
    router = None
    if cfg.memory_layer.enabled:
        ml = cfg.memory_layer
        shards = [serve.deployment(ValueShard, name=f"ValueShard{i}", num_replicas=ml.replicas_per_shard,
                                   ray_actor_options=cpu0, health_check_period_s=1, health_check_timeout_s=30,
                                   max_ongoing_requests=64).bind(cfg, i) for i in range(ml.shards)]
        router = serve.deployment(LayerRouter, name=ROUTER, ray_actor_options=cpu0,
                                  max_ongoing_requests=max(256, 2 * ml.max_batch_size)).bind(cfg, *shards)
    consolidation = serve.deployment(ConsolidationBackend, name="Consolidation", ray_actor_options=cpu0,
                                     health_check_period_s=10).bind(cfg, schedule)
    app = MemoryApi.options(num_replicas=cfg.retriever.replicas, ray_actor_options=cpu0).bind(
        cfg, token, router, consolidation, layer_dim)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.http.host}:{port}"
    _wait_healthy(url, timeout_s)
    return Served(url, note or "none (auth = 'none')", version, origin, port)


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
