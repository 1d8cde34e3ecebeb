"""The built-in decoder-only GPT: one read, nanoGPT-style.

Sizes: ``tiny`` (fast tests), ``small`` (~10M params, the demo), ``base`` (~100M, benchmarks).
Tokens are bytes (vocab 256) unless the data says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainmem.memory_services.config import EngramConfig, ProductKeyConfig

# name -> (n_layer, n_head, d_model, seq_len)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 4, 64, 64),
    "small": (6, 6, 384, 256),
    "base": (14, 12, 768, 512),
}


@dataclass(kw_only=True)
class ModelConfig:
    size: str = "tiny"
    """Preset: tiny | small | base. Fields set explicitly below override the preset."""
    n_layer: int | None = None
    """Transformer blocks (None: from size)."""
    n_head: int | None = None
    """Attention heads (None: from size)."""
    d_model: int | None = None
    """Hidden width (None: from size)."""
    seq_len: int | None = None
    """Context length in tokens (None: from size)."""
    vocab_size: int = 256
    """Token vocabulary; 256 for byte-level text."""
    norm: str = "rmsnorm"
    """Normalization: rmsnorm | layernorm."""
    dropout: float = 0.0
    """Dropout probability on attention output, MLP output and embeddings."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    memory_layers: list[int] = field(default_factory=list)
    """Block indices whose MLP is replaced by a product-key memory layer (memory_services)."""
    product_key: ProductKeyConfig = field(default_factory=ProductKeyConfig)
    """[model.product_key] the memory layers' settings (d_model = 0: the model's width)."""
    ngram_memory: bool = False
    """Add a hashed n-gram (Engram) memory to the embedding output; its tables are trained row-sparse."""
    engram: EngramConfig = field(default_factory=EngramConfig)
    """[model.engram] the n-gram memory's settings (d_model = 0: the model's width)."""
    init_memory_from: str = ""
    """A run directory or memory store whose memory layer values replace this model's at init_memory_step."""
    init_memory_step: int = 0
    """The step whose restore is followed by init_memory_from (set by `trainmem launch --init-memory-from`)."""

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r} is not one of {sorted(SIZES)}")
        n_layer, n_head, d_model, seq_len = SIZES[self.size]
        self.n_layer = n_layer if self.n_layer is None else self.n_layer
        self.n_head = n_head if self.n_head is None else self.n_head
        self.d_model = d_model if self.d_model is None else self.d_model
        self.seq_len = seq_len if self.seq_len is None else self.seq_len
        for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm={self.norm!r} must be 'rmsnorm' or 'layernorm'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        bad = [i for i in self.memory_layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"memory_layers={bad} are outside 0..{self.n_layer - 1}")
        for name in ("product_key", "engram"):
            width = getattr(self, name).d_model
            if width not in (0, self.d_model):
                raise ValueError(f"{name}.d_model={width} must be 0 or the model's d_model={self.d_model}")
        if self.init_memory_step < 0:
            raise ValueError(f"init_memory_step={self.init_memory_step} must be >= 0")

    def memory_layer_config(self) -> ProductKeyConfig:
        """The product-key layer config of blocks in memory_layers."""
        return replace(self.product_key, d_model=self.d_model)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block; ``mlp`` may be swapped for a memory layer."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = _norm(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embedding(nn.Module):
    """Token + position embeddings, plus the n-gram memory's read when ``ngram_memory`` is on."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.ngram = _ngram_memory(cfg) if cfg.ngram_memory else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        if self.ngram is not None:
            x = x + self.ngram.embed(x, idx)
        return self.dropout(x)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = _norm(cfg)
        self.out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class GPT(nn.Module):
    """Embedding → blocks → head. ``blocks`` is a ModuleList so policies can wrap each block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(
            Block(cfg, _memory_mlp(cfg) if i in cfg.memory_layers else None) for i in range(cfg.n_layer)
        )
        self.head = Head(cfg)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _memory_mlp(cfg: ModelConfig) -> nn.Module:
    # Imported here so the plain GPT needs nothing from memory_services' layers.
    from trainmem.memory_services import ProductKeyMemory

    return ProductKeyMemory(cfg.memory_layer_config())


def _ngram_memory(cfg: ModelConfig) -> nn.Module:
    from trainmem.memory_services import HashedNgramMemory

    return HashedNgramMemory(replace(cfg.engram, d_model=cfg.d_model))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    """The same (cfg, seed) always gives bitwise the same initial parameters."""
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        return GPT(cfg)


def split_into_stages(model: GPT, layers_per_stage: list[int]) -> list[nn.Sequential]:
    """Split ``model`` into pipeline stages by block counts (uneven allowed).

    The first stage also holds the embedding, the last the head. The stages share the
    model's parameters (no copies), so gradients land on ``model``.
    """
    if sum(layers_per_stage) != len(model.blocks) or any(n < 0 for n in layers_per_stage):
        raise ValueError(
            f"layers_per_stage={layers_per_stage} must be non-negative and sum to n_layer={len(model.blocks)}"
        )
    stages: list[nn.Sequential] = []
    start = 0
    for i, n in enumerate(layers_per_stage):
        parts: list[nn.Module] = []
        if i == 0:
            parts.append(model.embed)
        parts.extend(model.blocks[start : start + n])
        if i == len(layers_per_stage) - 1:
            parts.append(model.head)
        stages.append(nn.Sequential(*parts))
        start += n
    return stages
