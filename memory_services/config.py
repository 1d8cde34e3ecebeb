"""Configs of the memory services: the ``[services]`` table and the memory layers' own settings.

Every field carries a docstring (read by ``trainmem config explain``); every check raises a
ValueError starting with ``"<field>=<value>"`` so the job-spec loader can name the TOML key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from croniter import croniter


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(kw_only=True)
class ProductKeyConfig:
    d_model: int = 0
    """Input and output width of the layer (the block's hidden size); 0: set by what holds it ([model]: its d_model)."""
    heads: int = 4
    """Memory heads; each picks its own top-k slots, their values are summed."""
    n_keys: int = 128
    """Sub-keys per half; the layer has n_keys**2 value slots."""
    k_dim: int = 128
    """Query width per head (split into two halves of k_dim/2 for the two sub-key tables)."""
    topk: int = 16
    """Slots read per head per token (also the per-half candidate count)."""
    v_dim: int = 0
    """Width of a value row; 0 means d_model."""
    gated: bool = True
    """Multiply the read value by SiLU(W x) and project back to d_model (the 'SwiLU' output of Memory Layers at Scale)."""
    sparse: bool = True
    """Value rows get sparse gradients (only the rows a step read); optimize them with value_optimizer()."""
    value_lr: float = 1e-3
    """Learning rate of the value rows' own optimizer."""

    def __post_init__(self) -> None:
        if self.d_model < 0:
            raise ValueError(f"d_model={self.d_model} must be > 0 (or 0 inside [model]: the model's width)")
        for name in ("heads", "n_keys", "k_dim", "topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.k_dim % 2:
            raise ValueError(f"k_dim={self.k_dim} must be even (two half-queries)")
        if self.topk > self.n_keys:
            raise ValueError(f"topk={self.topk} must be <= n_keys={self.n_keys}")
        if self.v_dim < 0:
            raise ValueError(f"v_dim={self.v_dim} must be >= 0 (0 means d_model)")
        if not self.value_lr > 0:
            raise ValueError(f"value_lr={self.value_lr} must be > 0")

    @property
    def value_dim(self) -> int:
        return self.v_dim or self.d_model

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass(kw_only=True)
class EngramConfig:
    d_model: int = 0
    """Hidden width the memory's output is added to; 0: set by what holds it ([model]: its d_model)."""
    orders: list[int] = field(default_factory=lambda: [2, 3])
    """N-gram orders looked up (the last n token ids, ending at each position)."""
    heads_per_order: int = 4
    """Independent hash heads per order (collisions in one head are rarely shared by all)."""
    table_rows: int = 65521
    """Rows per head table (a prime spreads the hash well)."""
    row_dim: int = 32
    """Width of one table row."""
    lr: float = 1e-2
    """Learning rate of the table rows (row-sparse Adam in a model, SGD on the prefetch path)."""

    def __post_init__(self) -> None:
        if not self.orders or any(n < 1 for n in self.orders):
            raise ValueError(f"orders={self.orders} must be a non-empty list of integers >= 1")
        if self.d_model < 0:
            raise ValueError(f"d_model={self.d_model} must be > 0 (or 0 inside [model]: the model's width)")
        for name in ("heads_per_order", "table_rows", "row_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")


@dataclass(kw_only=True)
class RetrieverConfig:
    kind: str = "hnsw"
    """FAISS index: flat (exact) | ivf (IVF-Flat) | hnsw (HNSW-Flat). Inner product on unit vectors (cosine)."""
    hnsw_m: int = 32
    """HNSW neighbours per node."""
    ef_construction: int = 80
    """HNSW build-time beam width."""
    ef_search: int = 64
    """HNSW search-time beam width (higher: better recall, slower)."""
    nlist: int = 256
    """IVF inverted lists; the index trains once 39*nlist vectors are in."""
    nprobe: int = 32
    """IVF lists scanned per query."""
    compact_ratio: float = 0.25
    """Rebuild the index without tombstoned rows once they exceed this fraction of it."""
    embedder: str = "minilm"
    """Text embedder: minilm (the bundled all-MiniLM-L6-v2, offline) | none (callers pass embeddings)."""
    replicas: int = 1
    """Retriever replicas (each holds the index; searches spread over them, writes go to the store)."""
    threads: int = 0
    """FAISS/OpenMP threads per replica; 0: the CPUs of its node (Ray would otherwise pin it to 1)."""
    max_batch_size: int = 1024
    """@serve.batch: most query vectors (summed over requests) fused into one FAISS search."""
    batch_wait_timeout_s: float = 0.001
    """@serve.batch: how long a search waits for others to join its batch."""
    save_every_s: float = 30.0
    """How often a replica saves its index beside the store (with the store seq it has applied)."""

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0: all CPUs of the node)")
        if self.batch_wait_timeout_s < 0 or self.save_every_s <= 0:
            raise ValueError(f"batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0 and "
                             f"save_every_s={self.save_every_s} > 0")
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"kind={self.kind!r} must be flat, ivf or hnsw")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.compact_ratio <= 1:
            raise ValueError(f"compact_ratio={self.compact_ratio} must be in (0, 1]")
        if self.embedder not in ("minilm", "none"):
            raise ValueError(f"embedder={self.embedder!r} must be minilm or none")


@dataclass(kw_only=True)
class ConsolidationConfig:
    schedule: str = "*/10 * * * *"
    """Cron expression for scheduled runs (croniter syntax)."""
    job_name: str = "default"
    """Name of the watermark kept in the store; jobs with different names consolidate independently."""
    similarity: float = 0.9
    """Cosine similarity at or above which two entries are near-duplicates and merge."""
    neighbours: int = 8
    """Nearest neighbours examined per new entry."""
    distill: bool = False
    """Write consolidated entries into a product-key memory layer's value rows by gradient steps."""
    distill_steps: int = 200
    """Gradient steps of distillation (only the rows the consolidated keys read are updated)."""
    distill_lr: float = 0.05
    """Learning rate of the distillation's sparse value-row optimizer."""
    layer_dir: str = ""
    """Where layer versions go (empty: inside the store directory, in layer/)."""
    lease_ttl_s: float = 60.0
    """The consolidation lease expires this long after its last renewal (renewed every third of it)."""
    compact_log_bytes: int = 64 << 20
    """After a run, the store's log is compacted once it exceeds this and half the base."""

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.schedule):
            raise ValueError(f"schedule={self.schedule!r} is not a valid cron expression, e.g. '*/10 * * * *'")
        if not self.job_name or not self.job_name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"job_name={self.job_name!r} must be non-empty letters, digits, '-' or '_'")
        if not 0 < self.similarity <= 1:
            raise ValueError(f"similarity={self.similarity} must be in (0, 1]")
        if self.neighbours <= 0:
            raise ValueError(f"neighbours={self.neighbours} must be > 0")
        if self.distill_steps <= 0:
            raise ValueError(f"distill_steps={self.distill_steps} must be > 0")
        if not self.distill_lr > 0:
            raise ValueError(f"distill_lr={self.distill_lr} must be > 0")
        if not self.lease_ttl_s >= 1:
            raise ValueError(f"lease_ttl_s={self.lease_ttl_s} must be >= 1")
        if self.compact_log_bytes <= 0:
            raise ValueError(f"compact_log_bytes={self.compact_log_bytes} must be > 0")


@dataclass(kw_only=True)
class HttpConfig:
    host: str = "127.0.0.1"
    """Address the HTTP API binds; keep 127.0.0.1 unless a proxy with TLS fronts it."""
    port: int = 8000
    """HTTP port; 0 picks a free one."""
    auth: str = "token"
    """token: every request but /health, /docs and /openapi.json needs `Authorization: Bearer <token>`;
    none: no token (only allowed when host is a loopback address)."""
    token_env: str = ""
    """Environment variable holding the token (read inside each replica); empty: use token_file."""
    token_file: str = ""
    """File holding the token (mode 0600); empty: `token` in the store directory, generated on first serve."""
    max_body_bytes: int = 8 << 20
    """Largest request body accepted (413 above, before anything is parsed)."""
    max_batch: int = 256
    """Most queries, entries or ids one request may carry (413 above)."""
    max_text_chars: int = 8192
    """Longest text accepted per entry (422 above)."""
    max_metadata_keys: int = 32
    """Most metadata keys per entry (string values up to 1024 chars, keys up to 128)."""
    max_k: int = 100
    """Largest k a search may ask for."""
    max_page: int = 1000
    """Largest page a listing may ask for."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host='' must be an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0..65535")
        if self.auth not in ("token", "none"):
            raise ValueError(f"auth={self.auth!r} must be 'token' or 'none'")
        if self.auth == "none" and not is_loopback(self.host):
            raise ValueError(f"auth='none' is only allowed on a loopback host, not host={self.host!r} "
                             "(fix: keep auth='token', or bind 127.0.0.1)")
        for name in ("max_body_bytes", "max_batch", "max_text_chars", "max_metadata_keys", "max_k", "max_page"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(kw_only=True)
class LayerServiceConfig:
    enabled: bool = True
    """Serve product-key memory-layer lookups."""
    from_run: str = ""
    """A trainmem run directory: serve one of its trained memory layers (newest intact checkpoint)."""
    layer: int = -1
    """With from_run: the block index of that layer (-1: the run's only memory layer)."""
    shards: int = 1
    """Value-table shards, one Serve deployment each; a router holds queries and sub-keys."""
    shard_by: str = "columns"
    """How the value table splits over shards: columns (value dims; the faster here, docs/benchmarks.md) | rows (slot ranges)."""
    replicas_per_shard: int = 1
    """Serve replicas of each shard (more than 1: a dead replica costs no errors)."""
    threads: int = 0
    """torch threads of the router and of each shard replica; 0: the CPUs of its node."""
    d_model: int | None = None
    """Input width of lookups (None: the run's, or 384 for a fresh layer)."""
    heads: int | None = None
    """Memory heads (None: the run's, or 4)."""
    n_keys: int | None = None
    """Sub-keys per half, n_keys**2 slots (None: the run's, or 128)."""
    topk: int | None = None
    """Slots read per head (None: the run's, or 16)."""
    max_batch_size: int = 4096
    """@serve.batch on the router: most lookup rows fused into one pass."""
    batch_wait_timeout_s: float = 0.002
    """@serve.batch: how long a lookup waits for others to join its batch."""
    shard_timeout_s: float = 5.0
    """A shard that does not answer within this is reported unavailable (HTTP 503, retryable)."""
    keep_versions: int = 4
    """Older layer versions each shard can still answer (lookups in flight across a write)."""

    def __post_init__(self) -> None:
        for name in ("shards", "replicas_per_shard", "max_batch_size", "keep_versions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("d_model", "heads", "n_keys", "topk"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0: all CPUs of the node)")
        if self.shard_by not in ("rows", "columns"):
            raise ValueError(f"shard_by={self.shard_by!r} must be 'rows' or 'columns'")
        if self.layer < -1:
            raise ValueError(f"layer={self.layer} must be a block index (or -1: the run's only memory layer)")
        if self.layer != -1 and not self.from_run:
            raise ValueError(f"layer={self.layer} needs from_run (the run whose block it names)")
        if self.batch_wait_timeout_s < 0 or not self.shard_timeout_s > 0:
            raise ValueError(f"batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0 and "
                             f"shard_timeout_s={self.shard_timeout_s} > 0")

    def layer_config(self) -> ProductKeyConfig:
        """A fresh layer's config (no run): the set fields, defaults for the rest."""
        return ProductKeyConfig(
            d_model=self.d_model or 384, heads=self.heads or 4, n_keys=self.n_keys or 128, topk=self.topk or 16,
            gated=False, k_dim=128,
        )

    def check_against(self, cfg: ProductKeyConfig, where: str) -> None:
        """Refuse, by name, a set field that differs from the layer being served."""
        for name in ("d_model", "heads", "n_keys", "topk"):
            want = getattr(self, name)
            if want is not None and want != getattr(cfg, name):
                raise ValueError(f"memory_layer.{name}={want} but {where} has {name}={getattr(cfg, name)} "
                                 f"(fix: remove memory_layer.{name} or set it to {getattr(cfg, name)})")


@dataclass(kw_only=True)
class ServicesConfig:
    store_path: str = "memory/store"
    """Directory of the memory store (an append-only log of Arrow frames; created on first use)."""
    embedding_dim: int = 384
    """Width of entry embeddings (384 for the bundled MiniLM)."""
    address: str = ""
    """Ray cluster to join; empty starts an embedded local cluster."""
    num_cpus: int = 2
    """CPUs of the embedded cluster."""
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """[services.retriever] the FAISS index."""
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    """[services.consolidation] the scheduled consolidation job."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """[services.http] the HTTP API."""
    memory_layer: LayerServiceConfig = field(default_factory=LayerServiceConfig)
    """[services.memory_layer] the memory-layer lookup deployment."""

    def __post_init__(self) -> None:
        if not self.store_path:
            raise ValueError("store_path='' must name a directory")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim={self.embedding_dim} must be > 0")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be > 0")
        if self.retriever.embedder == "minilm" and self.embedding_dim != 384:
            raise ValueError(f"embedding_dim={self.embedding_dim} must be 384 with retriever.embedder='minilm'")
        layer_dim = self.memory_layer.d_model or (None if self.memory_layer.from_run else 384)
        if self.consolidation.distill and layer_dim is not None and layer_dim != self.embedding_dim:
            raise ValueError(
                f"embedding_dim={self.embedding_dim} must equal memory_layer.d_model={layer_dim} "
                "when consolidation.distill is on (the layer is keyed by entry embeddings)"
            )

    @property
    def store_dir(self) -> Path:
        return Path(self.store_path)

    @property
    def layer_dir(self) -> Path:
        return Path(self.consolidation.layer_dir) if self.consolidation.layer_dir else self.store_dir / "layer"
