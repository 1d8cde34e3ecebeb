"""Product-key memory layer (Lample et al. 2019; Memory Layers at Scale, 2024).

A query net maps each token to ``heads`` queries. Each query is split in two halves scored
against two sub-key tables of ``n_keys`` rows; the top-k of each half give k*k candidate slots
whose score is the sum of the halves. The top-k of those candidates is *exactly* the top-k
over all n_keys**2 slots (a slot in the global top-k must have both halves in their half's
top-k). On CPU the selection runs in one fused kernel (``pk_select``). Softmax in float32, then
one ``embedding_bag(sum, per_sample_weights)``. A bf16 layer (``layer.to(torch.bfloat16)``) scores
and reads in bf16 with the same float32 softmax.

Training reads *active rows*: the unique slots of a step are gathered into one dense block, the
bag runs over that block, and the value table's gradient is those rows only (a coalesced sparse
tensor built without a sort or a merge), which ``RowSparseAdam`` updates with torch's fused Adam.
``ColumnShardedProductKeyMemory`` splits value columns across ranks.
"""

from __future__ import annotations

import functools
import math
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import ProductKeyConfig
from . import pk_select


@functools.lru_cache(maxsize=32)
def _candidate_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (i, j) with (i+1)*(j+1) <= k: the only ones that can reach the top-k.

    With both halves sorted, pair (i, j) is outscored by every (i', j') with i' <= i, j' <= j:
    (i+1)*(j+1) - 1 others. If that is >= k it cannot be in the top-k. This keeps about
    k*ln(k) of the k*k pairs (130 of 1024 at k=32) and stays exact.
    """
    pairs = [(i, j) for i in range(k) for j in range(k // (i + 1))]
    ci, cj = zip(*pairs)
    return torch.tensor(ci), torch.tensor(cj)


def product_key_topk(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and slot indices of the top-``k`` slots per (token, head).

    q: (N, H, k_dim); keys: (H, 2, n_keys, k_dim/2). Returns (N, H, k) scores and indices in
    ``[0, n_keys**2)``, index ``i * n_keys + j`` for sub-keys (i, j), sorted by score.
    """
    h, _, n_keys, half = keys.shape
    n = q.shape[0]
    # Both halves of all heads in one batched matmul: (H*2, N, half) @ (H*2, half, n_keys).
    qh = q.reshape(n, h * 2, half).transpose(0, 1)
    scores = torch.bmm(qh, keys.reshape(h * 2, n_keys, half).transpose(1, 2))
    ci, cj = _candidate_pairs(k)
    fused = pk_select.select(scores, ci, cj, k)
    if fused is not None:
        i, j, best_scores = fused
        if scores.requires_grad:  # the same winners' scores, through autograd
            halves = scores.view(h, 2, n, n_keys)
            best_scores = halves[:, 0].gather(-1, i) + halves[:, 1].gather(-1, j)
        return best_scores.permute(1, 0, 2), (i * n_keys + j).permute(1, 0, 2)
    v, i = scores.topk(k, dim=-1)  # sorted, descending: _candidate_pairs relies on it
    v, i = v.view(h, 2, n, k), i.view(h, 2, n, k)
    ci, cj = ci.to(q.device), cj.to(q.device)
    cand = v[:, 0].index_select(-1, ci) + v[:, 1].index_select(-1, cj)
    best_scores, best = cand.topk(k, dim=-1)
    # Slot ids only for the k winners, not for every candidate pair.
    idx = i[:, 0].gather(-1, ci[best]) * n_keys + i[:, 1].gather(-1, cj[best])
    return best_scores.permute(1, 0, 2), idx.permute(1, 0, 2)


class GatherRows(torch.autograd.Function):
    """``table[rows]`` for sorted unique ``rows``; the table's gradient is exactly those rows.

    The gradient is a sparse tensor already coalesced (one entry per row, rows sorted), so
    neither autograd nor the optimizer sorts or merges duplicates.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), grad.contiguous(), ctx.table_shape,
                                         is_coalesced=True, check_invariants=False)
        return sparse, None


def active_rows(idx: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique rows, each index's position among them): a linear-time mark-and-compact."""
    flat = idx.reshape(-1)
    mark = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
    mark[flat] = True
    rows = mark.nonzero().squeeze(1)
    slot = torch.empty(n_rows, dtype=torch.long, device=idx.device)
    slot[rows] = torch.arange(len(rows), device=idx.device)
    return rows, slot[flat].view(idx.shape)


def bag(table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, sparse: bool) -> torch.Tensor:
    """sum_l weights[n, l] * table[idx[n, l]]; with ``sparse`` and gradients, through the active rows."""
    weights = weights.to(table.dtype)
    if sparse and torch.is_grad_enabled() and table.requires_grad:
        rows, local = active_rows(idx, table.shape[0])
        return F.embedding_bag(local, GatherRows.apply(table, rows), per_sample_weights=weights, mode="sum")
    return F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")


class ProductKeyMemory(nn.Module):
    """Drop-in for a block's MLP: (..., d_model) → (..., d_model)."""

    def __init__(self, cfg: ProductKeyConfig):
        super().__init__()
        if cfg.d_model <= 0:
            raise ValueError(f"d_model={cfg.d_model} must be set (> 0) before building the layer")
        self.cfg = cfg
        self.query = nn.Linear(cfg.d_model, cfg.heads * cfg.k_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2))
        # An EmbeddingBag as the holder of ``values.weight`` (the name checkpoints use); reads go through bag().
        # Its ``sparse`` flag tells DistributedDataParallel the weight's gradient is sparse.
        self.values = nn.EmbeddingBag(cfg.n_slots, self._local_value_dim(), mode="sum", sparse=cfg.sparse)
        self.gate = nn.Linear(cfg.d_model, cfg.value_dim, bias=False) if cfg.gated else None
        needs_out = cfg.gated or cfg.value_dim != cfg.d_model
        self.out = nn.Linear(cfg.value_dim, cfg.d_model, bias=False) if needs_out else None
        self.reset_parameters()
        pk_select.kernel()  # compiled (or loaded) now, at model build, not inside a timed training step

    def _local_value_dim(self) -> int:
        return self.cfg.value_dim

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.cfg.k_dim // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.values.weight, std=self.cfg.value_dim**-0.5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d_model) → float32 weights (N, H*k) and slot indices (N, H*k)."""
        cfg = self.cfg
        q = self.query(x).view(x.shape[0], cfg.heads, cfg.k_dim)
        scores, idx = product_key_topk(q, self.keys, cfg.topk)
        weights = F.softmax(scores.float(), dim=-1)  # float32 in every precision
        return weights.flatten(1), idx.flatten(1)

    def read_values(self, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return bag(self.values.weight, idx, weights, self.cfg.sparse)

    def finish(self, flat: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """From the values read (N, v_dim) to the layer output: gate and output projection."""
        out = read
        if self.gate is not None:
            out = out * F.silu(self.gate(flat))
        if self.out is not None:
            out = self.out(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.lookup(flat)
        out = self.finish(flat, self.read_values(weights, idx))
        return out.view(*shape[:-1], out.shape[-1])

    def value_parameters(self) -> list[nn.Parameter]:
        return [self.values.weight]

    @property
    def value_lr(self) -> float:
        return self.cfg.value_lr

    @property
    def sparse_values(self) -> bool:
        return self.cfg.sparse


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (each saw only its columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherColumns(torch.autograd.Function):
    """All-gather column slices forward; backward keeps this rank's slice (the rest is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.cols = rank, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        start = ctx.rank * ctx.cols
        return grad[..., start : start + ctx.cols].contiguous(), None


class ColumnShardedProductKeyMemory(ProductKeyMemory):
    """Each rank holds ``value_dim / world`` columns of every value row (Shard(1)).

    Queries, keys, gate and output projection are replicated (same seed on every rank, or
    ``from_full``); slot indices are computed redundantly, so only the read values travel.
    """

    def __init__(self, cfg: ProductKeyConfig, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if cfg.value_dim % self.world:
            raise ValueError(f"v_dim={cfg.value_dim} must be divisible by the world size {self.world}")
        super().__init__(cfg)

    def _local_value_dim(self) -> int:
        return self.cfg.value_dim // self.world

    @classmethod
    def from_full(cls, full: ProductKeyMemory, group=None) -> "ColumnShardedProductKeyMemory":
        """Shard an unsharded layer's parameters (every rank passes the same ``full``)."""
        shard = cls(full.cfg, group)
        state = {k: v for k, v in full.state_dict().items() if k != "values.weight"}
        shard.load_state_dict(state, strict=False)
        cols = shard._local_value_dim()
        with torch.no_grad():
            shard.values.weight.copy_(full.values.weight[:, shard.rank * cols : (shard.rank + 1) * cols])
        return shard

    def read_values(self, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        weights = _CopyToShards.apply(weights, self.group)
        return _GatherColumns.apply(bag(self.values.weight, idx, weights, self.cfg.sparse), self.group)
