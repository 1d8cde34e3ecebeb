"""Configs of the memory services: the ``[services]`` table and the memory layers' own settings.

Every field carries a docstring (read by ``trainmem config explain``); every check raises a
ValueError starting with ``"<field>=<value>"`` so the job-spec loader can name the TOML key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from croniter import croniter


@dataclass(kw_only=True)
class ProductKeyConfig:
    d_model: int = 512
    """Input and output width of the layer (the block's hidden size)."""
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
        for name in ("d_model", "heads", "n_keys", "k_dim", "topk"):
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
    d_model: int = 512
    """Hidden width the memory's output is added to."""
    orders: list[int] = field(default_factory=lambda: [2, 3])
    """N-gram orders looked up (the last n token ids, ending at each position)."""
    heads_per_order: int = 4
    """Independent hash heads per order (collisions in one head are rarely shared by all)."""
    table_rows: int = 65521
    """Rows per head table (a prime spreads the hash well)."""
    row_dim: int = 32
    """Width of one table row."""
    lr: float = 1e-2
    """Learning rate of the host-side sparse row updates."""

    def __post_init__(self) -> None:
        if not self.orders or any(n < 1 for n in self.orders):
            raise ValueError(f"orders={self.orders} must be a non-empty list of integers >= 1")
        for name in ("d_model", "heads_per_order", "table_rows", "row_dim"):
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

    def __post_init__(self) -> None:
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
    """Where distilled layer versions go (empty: next to the store, in layer/)."""

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


@dataclass(kw_only=True)
class HttpConfig:
    host: str = "127.0.0.1"
    """Address the HTTP API binds; keep 127.0.0.1 unless a proxy with TLS fronts it."""
    port: int = 8000
    """HTTP port; 0 picks a free one."""
    token_env: str = ""
    """Name of an environment variable holding the bearer token; empty: no token required."""
    max_batch: int = 256
    """Most queries or entries one request may carry (413 above)."""
    max_text_chars: int = 8192
    """Longest text accepted per entry (422 above)."""
    max_k: int = 100
    """Largest k a search may ask for."""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host='' must be an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in 0..65535")
        for name in ("max_batch", "max_text_chars", "max_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(kw_only=True)
class LayerServiceConfig:
    enabled: bool = True
    """Serve product-key memory-layer lookups."""
    d_model: int = 384
    """Input width of lookups (the embedding width when the layer holds distilled entries)."""
    heads: int = 4
    """Memory heads."""
    n_keys: int = 128
    """Sub-keys per half (n_keys**2 slots)."""
    topk: int = 16
    """Slots read per head."""
    max_batch_size: int = 64
    """@serve.batch: most lookups fused into one forward pass."""
    batch_wait_timeout_s: float = 0.005
    """@serve.batch: how long to wait for a batch to fill."""

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "n_keys", "topk", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0")

    def layer_config(self) -> ProductKeyConfig:
        return ProductKeyConfig(
            d_model=self.d_model, heads=self.heads, n_keys=self.n_keys, topk=self.topk, gated=False, k_dim=128
        )


@dataclass(kw_only=True)
class ServicesConfig:
    store_path: str = "memory/store.parquet"
    """Parquet file of the memory store (created on first write; a .lock file sits beside it)."""
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
            raise ValueError("store_path='' must name a .parquet file")
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim={self.embedding_dim} must be > 0")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be > 0")
        if self.retriever.embedder == "minilm" and self.embedding_dim != 384:
            raise ValueError(f"embedding_dim={self.embedding_dim} must be 384 with retriever.embedder='minilm'")
        if self.consolidation.distill and self.memory_layer.d_model != self.embedding_dim:
            raise ValueError(
                f"embedding_dim={self.embedding_dim} must equal memory_layer.d_model={self.memory_layer.d_model} "
                "when consolidation.distill is on (the layer is keyed by entry embeddings)"
            )
