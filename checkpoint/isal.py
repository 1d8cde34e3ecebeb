"""Reed-Solomon over GF(2^8) with ISA-L, called on preallocated buffers (no copies, no headers).

pyeclib's bytes API wraps the same ISA-L kernels but copies every fragment and prepends an
80-byte header, which caps it near 0.5-0.7 GB/s here. We load the ``libisal`` shared object that
the pyeclib wheel bundles and call ``ec_encode_data`` on numpy rows directly, which runs at
about memcpy speed. The generator matrices are ISA-L's own (``gf_gen_rs_matrix`` as in
liberasurecode's ``isa_l_rs_vand``, ``gf_gen_cauchy1_matrix`` as in ``isa_l_rs_cauchy``), so our
parity bytes equal pyeclib's payloads for the same k, m and stripe (the tests check this).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from functools import lru_cache

import numpy as np

_u8p = ctypes.POINTER(ctypes.c_ubyte)


class ErasureError(RuntimeError):
    """Too few fragments survive, or a fragment has the wrong shape; the message says which."""


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    """ISA-L from the pyeclib wheel (``pyeclib.libs/libisal*.so*``), else a system libisal."""
    import pyeclib

    here = os.path.dirname(os.path.dirname(pyeclib.__file__))
    candidates = sorted(glob.glob(os.path.join(here, "pyeclib.libs", "libisal*.so*")))
    candidates += ["libisal.so.2", "libisal.so"]
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            errors.append(f"{path}: {e}")
    else:
        raise ErasureError(
            "ISA-L shared library not found (fix: `pip install pyeclib==1.8.0` wheels bundle it, "
            "or `apt-get install libisal2`); tried " + "; ".join(errors)
        )
    lib.ec_encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _u8p, ctypes.c_void_p, ctypes.c_void_p]
    lib.ec_encode_data.restype = None
    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, _u8p, _u8p]
    lib.ec_init_tables.restype = None
    lib.gf_gen_rs_matrix.argtypes = [_u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_gen_cauchy1_matrix.argtypes = [_u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_invert_matrix.argtypes = [_u8p, _u8p, ctypes.c_int]
    lib.gf_invert_matrix.restype = ctypes.c_int
    return lib


def _ptr(a: np.ndarray) -> _u8p:
    return a.ctypes.data_as(_u8p)


def _row_pointers(rows: list[np.ndarray]) -> ctypes.Array:
    return (ctypes.c_void_p * len(rows))(*[r.ctypes.data for r in rows])


class RSCodec:
    """k data + m parity fragments of equal length; any k of the k+m rebuild the rest.

    ``matrix``: "cauchy" (every k x k submatrix invertible: any m erasures decode) or "vand"
    (ISA-L's Vandermonde-derived matrix, liberasurecode's ``isa_l_rs_vand``; ISA-L documents it
    as not guaranteed invertible for every erasure pattern at larger k+m).
    """

    def __init__(self, k: int, m: int, matrix: str = "cauchy"):
        if k < 1 or m < 0 or k + m > 255:
            raise ValueError(f"k={k}, m={m}: need k >= 1, m >= 0, k + m <= 255")
        if matrix not in ("cauchy", "vand"):
            raise ValueError(f"matrix={matrix!r} must be 'cauchy' or 'vand'")
        self.k, self.m, self.matrix = k, m, matrix
        lib = _lib()
        self.gen = np.zeros((k + m, k), dtype=np.uint8)
        (lib.gf_gen_cauchy1_matrix if matrix == "cauchy" else lib.gf_gen_rs_matrix)(_ptr(self.gen), k + m, k)
        self._enc_tables = self._tables(self.gen[k:]) if m else None
        self._dec_cache: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def _tables(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        tables = np.zeros(32 * self.k * rows.shape[0], dtype=np.uint8)
        _lib().ec_init_tables(self.k, rows.shape[0], _ptr(rows), _ptr(tables))
        return tables

    @staticmethod
    def _check_rows(rows: list[np.ndarray], length: int, what: str) -> None:
        for i, r in enumerate(rows):
            if r.dtype != np.uint8 or r.ndim != 1 or r.shape[0] != length or not r.flags.c_contiguous:
                raise ErasureError(f"{what}[{i}]: need a contiguous uint8 row of {length} bytes, got {r.dtype} {r.shape}")

    def encode(self, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
        """Write the m parity rows from the k data rows, in place (rows are equal-length uint8)."""
        if len(data) != self.k or len(parity) != self.m:
            raise ErasureError(f"encode needs {self.k} data and {self.m} parity rows, got {len(data)} and {len(parity)}")
        if not self.m:
            return
        length = data[0].shape[0]
        self._check_rows(data, length, "data")
        self._check_rows(parity, length, "parity")
        _lib().ec_encode_data(length, self.k, self.m, _ptr(self._enc_tables), _row_pointers(data), _row_pointers(parity))

    def _decode_tables(self, have: tuple[int, ...], lost: tuple[int, ...]) -> np.ndarray:
        """GF tables mapping the k fragments ``have`` to the fragments ``lost`` (data or parity)."""
        key = (have, lost)
        with self._lock:
            cached = self._dec_cache.get(key)
        if cached is not None:
            return cached
        sub = np.ascontiguousarray(self.gen[list(have)])
        inv = np.zeros((self.k, self.k), dtype=np.uint8)
        if _lib().gf_invert_matrix(_ptr(sub.copy()), _ptr(inv), self.k) != 0:
            raise ErasureError(f"fragments {list(have)} are not independent under the {self.matrix} matrix")
        # gen[j] @ inv maps the surviving rows to fragment j (data rows of gen are the identity).
        rows = np.zeros((len(lost), self.k), dtype=np.uint8)
        for out_i, j in enumerate(lost):
            for c in range(self.k):
                acc = 0
                for t in range(self.k):
                    acc ^= _gf_mul(int(self.gen[j, t]), int(inv[t, c]))
                rows[out_i, c] = acc
        tables = self._tables(rows)
        with self._lock:
            self._dec_cache[key] = tables
        return tables

    def reconstruct(self, fragments: dict[int, np.ndarray], want: list[int], out: dict[int, np.ndarray]) -> None:
        """Rebuild fragments ``want`` into ``out[j]`` from any k entries of ``fragments`` (index -> row)."""
        if len(fragments) < self.k:
            raise ErasureError(f"need {self.k} fragments to decode, have {sorted(fragments)}")
        have = tuple(sorted(fragments)[: self.k])
        want = [j for j in want if j not in fragments]
        if not want:
            for j in out:
                if j in fragments and out[j] is not fragments[j]:
                    np.copyto(out[j], fragments[j])
            return
        rows_in = [fragments[j] for j in have]
        length = rows_in[0].shape[0]
        self._check_rows(rows_in, length, "fragment")
        rows_out = [out[j] for j in want]
        self._check_rows(rows_out, length, "out")
        tables = self._decode_tables(have, tuple(want))
        _lib().ec_encode_data(length, self.k, len(want), _ptr(tables), _row_pointers(rows_in), _row_pointers(rows_out))


@lru_cache(maxsize=None)
def _gf_mul(a: int, b: int) -> int:
    """GF(2^8) multiply with ISA-L's polynomial 0x11d (only for the small k x k decode matrices)."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r
