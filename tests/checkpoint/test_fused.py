"""The fused capture pass: the same fragments as staging the buffer and encoding whole rows, for any
sizes, k, m and stripe; any m lost fragments decode back bitwise."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainmem.checkpoint import RSCodec, SnapshotLayout
from trainmem.checkpoint.fused import RowPlan, byte_view, fused_pass
from trainmem.checkpoint.layout import stripes, tensor_views, unpack
from trainmem.checkpoint.segments import checksum

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64]


@st.composite
def states(draw):
    n = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    out = {}
    for i in range(n):
        dt = draw(st.sampled_from(DTYPES))
        numel = draw(st.integers(0, 5000))
        t = (torch.randn(numel, generator=g) * 100).to(dt) if dt.is_floating_point else \
            torch.randint(0, 200, (numel,), generator=g).to(dt)
        out[f"t{i}"] = t
    return out


def _reference(tensors, k, m):
    """The former capture: stage into a zeroed buffer, encode whole rows, checksum each."""
    layout = SnapshotLayout.plan(tensors, k, m)
    buf = torch.zeros(layout.buffer_len, dtype=torch.uint8)
    for name, view in tensor_views(buf, layout).items():
        view.copy_(tensors[name])
    rows = list(buf.numpy().reshape(k, layout.frag_len))
    parity = [np.zeros(layout.frag_len, np.uint8) for _ in range(m)]
    RSCodec(k, m).encode(rows, parity)
    return layout, rows + parity


@settings(max_examples=60, deadline=None)
@given(tensors=states(), k=st.integers(1, 5), m=st.integers(0, 3), stripe=st.sampled_from([64, 192, 4096, 1 << 20]),
       seed=st.integers(0, 1000))
def test_fused_pass_equals_staging_then_encoding_and_decodes_any_m_losses(tensors, k, m, stripe, seed):
    layout, expect = _reference(tensors, k, m)
    rows = [np.full(layout.frag_len, 0xAB, np.uint8) for _ in range(k + m)]  # recycled segments hold old bytes
    sums = fused_pass(RowPlan(layout, stripe), [byte_view(tensors[s.name]) for s in layout.tensors],
                      rows[:k], rows[k:], RSCodec(k, m) if m else None)
    for j in range(k + m):
        assert np.array_equal(rows[j], expect[j]), f"fragment {j}"
        assert sums[j] == checksum(expect[j]), "the streaming xxh3 equals the one-shot one"
    rng = np.random.default_rng(seed)
    lost = sorted(rng.choice(k + m, size=min(m, k + m - k), replace=False).tolist()) if m else []
    have = {j: rows[j] for j in range(k + m) if j not in lost}
    out = {j: have[j].copy() if j in have else np.zeros(layout.frag_len, np.uint8) for j in range(k)}
    RSCodec(k, m).reconstruct(have, [j for j in range(k) if j in lost], out)
    buf = np.concatenate([out[j] for j in range(k)])
    for name, t in unpack(buf, layout).items():
        assert torch.equal(t, tensors[name]), name


@given(tensors=states(), world=st.integers(1, 5))
def test_stripes_cover_every_tensor_once_in_order(tensors, world):
    parts = stripes(tensors, world)
    assert len(parts) == world and [n for p in parts for n in p] == list(tensors)
