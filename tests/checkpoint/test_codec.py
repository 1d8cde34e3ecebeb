"""Reed-Solomon through ISA-L on buffers: property test, pyeclib cross-check, error messages."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyeclib.ec_iface import ECDriver

from trainmem.checkpoint import ErasureError, RSCodec

_PYECLIB_HEADER = 80  # liberasurecode's fragment_header_t


@st.composite
def _case(draw):
    k = draw(st.integers(1, 10))
    m = draw(st.integers(0, 6))
    length = draw(st.integers(1, 4096))
    seed = draw(st.integers(0, 2**32 - 1))
    lost = draw(st.lists(st.integers(0, k + m - 1), unique=True, max_size=m))
    return k, m, length, seed, lost


@settings(max_examples=100, deadline=None)
@given(_case())
def test_decode_of_encode_is_identity_for_any_m_erasures(case):
    k, m, length, seed, lost = case
    rng = np.random.default_rng(seed)
    codec = RSCodec(k, m)
    data = rng.integers(0, 256, size=(k, length), dtype=np.uint8)
    parity = np.zeros((m, length), dtype=np.uint8)
    codec.encode(list(data), list(parity))
    frags = {j: (data[j] if j < k else parity[j - k]) for j in range(k + m) if j not in lost}
    out = {j: np.zeros(length, np.uint8) for j in lost}
    codec.reconstruct(frags, lost, out)
    for j in lost:
        expect = data[j] if j < k else parity[j - k]
        assert np.array_equal(out[j], expect), f"fragment {j} of k={k} m={m} rebuilt wrong"


@pytest.mark.parametrize("matrix,ec_type", [("vand", "isa_l_rs_vand"), ("cauchy", "isa_l_rs_cauchy")])
@pytest.mark.parametrize("k,m", [(2, 2), (4, 2), (6, 3)])
def test_parity_equals_pyeclib_isal_payloads(matrix, ec_type, k, m):
    """Our zero-copy ISA-L calls produce the same parity bytes as pyeclib's ISA-L backend."""
    stripe = 64 * 37
    payload = os.urandom(k * stripe)
    data = np.frombuffer(payload, dtype=np.uint8).reshape(k, stripe).copy()
    parity = np.zeros((m, stripe), dtype=np.uint8)
    RSCodec(k, m, matrix).encode(list(data), list(parity))
    ref = ECDriver(k=k, m=m, ec_type=ec_type).encode(payload)
    for i in range(k):
        assert ref[i][_PYECLIB_HEADER : _PYECLIB_HEADER + stripe] == data[i].tobytes()
    for i in range(m):
        assert ref[k + i][_PYECLIB_HEADER : _PYECLIB_HEADER + stripe] == parity[i].tobytes(), f"parity {i}"
    # and pyeclib decodes from a set our codec would use
    keep = ref[m:]
    assert ECDriver(k=k, m=m, ec_type=ec_type).decode(keep) == payload


def test_too_few_fragments_is_a_clear_error():
    codec = RSCodec(3, 1)
    rows = {0: np.zeros(64, np.uint8), 1: np.zeros(64, np.uint8)}
    with pytest.raises(ErasureError, match=r"need 3 fragments"):
        codec.reconstruct(rows, [2], {2: np.zeros(64, np.uint8)})


def test_wrong_row_shape_is_rejected():
    codec = RSCodec(2, 1)
    with pytest.raises(ErasureError, match=r"parity\[0\]"):
        codec.encode([np.zeros(64, np.uint8)] * 2, [np.zeros(32, np.uint8)])
