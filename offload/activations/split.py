"""MEMO's token-wise split of one pre-norm transformer block.

The block is cut into its per-token parts and its one cross-token part:

    A (per token)   x -> ln1 -> qkv                       (saves x, ln1 stats/output)
    core            sdpa(q, k, v) -> y                    (saves q, k, v, output, logsumexp)
    B (per token)   h = x + drop(proj(y)); out = h + drop(mlp(ln2(h)))

For the first s tokens (rows of the flattened batch) parts A and B run normally and everything they save is offloaded. For the
remaining rows they run under :func:`recompute`: only their inputs (x, y and the dropout masks of that
range) are offloaded and the rest is recomputed in backward. The core's saved tensors (q, k, v,
attention output, logsumexp) are always offloaded whole, so recomputing later tokens never needs
earlier tokens' K/V recomputed: causal attention's backward reads the offloaded K/V. Per-token
parts have no cross-token dependency, so the split is exact up to float rounding of the sliced
matmuls.

Dropout: both masks are drawn up front over the whole (B, T, C) shape in the block's own order
(attention, then MLP), as ``dropout(ones)``, so the RNG stream and every mask element equal the
unsplit block's; the slices are then multiplied in, as dropout itself does.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_splittable(block: nn.Module) -> bool:
    """A pre-norm GPT block with a plain per-token MLP (a memory-layer MLP is not split)."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    need = [(block, "ln1"), (block, "ln2"), (attn, "qkv"), (attn, "proj"), (attn, "n_head"), (attn, "dropout"),
            (mlp, "fc"), (mlp, "proj"), (mlp, "dropout")]
    return all(owner is not None and hasattr(owner, name) for owner, name in need) and type(mlp).__name__ == "MLP"


def _part_a(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.attn.qkv(block.ln1(x))


def _core(block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    b, t, c3 = qkv.shape
    c, nh = c3 // 3, block.attn.n_head
    q, k, v = qkv.split(c, dim=2)
    q, k, v = (z.view(b, t, nh, c // nh).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).contiguous().view(b, t, c)


def _part_b(block: nn.Module, y: torch.Tensor, x: torch.Tensor, m1, m2) -> torch.Tensor:
    a = block.attn.proj(y)
    h = x + (a * m1 if m1 is not None else a)
    mlp = block.mlp
    z = mlp.proj(F.gelu(mlp.fc(block.ln2(h))))
    return h + (z * m2 if m2 is not None else z)


def _masks(block: nn.Module, x: torch.Tensor):
    def one(drop: nn.Module):
        if not drop.training or drop.p == 0.0:
            return None
        return drop(torch.ones_like(x))  # the same RNG draw and values as dropout(x) uses

    return one(block.attn.dropout), one(block.mlp.dropout)


class Probe:
    """Measurement hooks for the planner's warm-up: tags saved bytes by part and times the parts."""

    def __init__(self, meter, block_index: int, sync: Callable[[], None]):
        self.meter, self.index, self.sync = meter, block_index, sync
        self.per_token_s = 0.0
        self.input_bytes = {"token_a": 0, "token_b": 0}

    def part(self, name: str):
        probe = self

        class _Ctx:
            def __enter__(self):
                probe.meter.tag = (probe.index, name)
                probe.sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                probe.sync()
                if name.startswith("token"):
                    probe.per_token_s += time.perf_counter() - self.t0
                probe.meter.tag = None

        return _Ctx()


def split_forward(
    block: nn.Module,
    x: torch.Tensor,
    s: int,
    run_recompute: Callable | None = None,
    probe: Probe | None = None,
) -> torch.Tensor:
    """Forward of ``block`` with its first ``s`` tokens kept for offload and the rest recomputed.

    Tokens are counted over the flattened (batch x sequence) rows, so both ranges are contiguous
    row slices (no strided views that matmuls would silently copy) and alpha = s / (B*T).
    """
    b, t, c = x.shape
    n = b * t
    s = max(0, min(int(s), n))
    m1, m2 = _masks(block, x)
    if probe is not None:  # the recomputed ranges' inputs: x for part A; the masks and y for part B
        probe.input_bytes["token_a"] = x.numel() * x.element_size()
        probe.input_bytes["token_b"] = sum(z.numel() * z.element_size() for z in (m1, m2) if z is not None)
    rows = [z.reshape(n, c) if z is not None else None for z in (x, m1, m2)]
    lo = [z[:s] if z is not None else None for z in rows]
    hi = [z[s:] if z is not None else None for z in rows]

    def part(name: str):
        return probe.part(name) if probe is not None else _NULL

    with part("token_a"):
        pieces = [_part_a(block, lo[0])] if s > 0 else []
        if s < n:
            pieces.append(run_recompute(lambda xx: _part_a(block, xx), [hi[0]]))
    qkv = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    with part("core"):
        y = _core(block, qkv.view(b, t, 3 * c)).view(n, c)
    if probe is not None and not probe.meter.holds(y):
        probe.input_bytes["token_b"] += y.numel() * y.element_size()  # else y is attention's saved output: offloaded anyway
    with part("token_b"):
        outs = [_part_b(block, y[:s], *lo)] if s > 0 else []
        if s < n:
            outs.append(run_recompute(lambda yy, xx, a, m: _part_b(block, yy, xx, a, m), [y[s:], *hi]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out.view(b, t, c)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()
