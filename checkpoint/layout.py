"""Where each tensor sits in a rank's snapshot buffer, and how that buffer splits into fragments.

A snapshot is one flat byte buffer: every tensor at a 64-byte-aligned offset, padded to
``k * frag_len`` so the k data fragments are plain row views of it (erasure coding then reads
the buffer in place). The layout travels as JSON next to every fragment; no pickle anywhere.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALIGN = 64
_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
    )
}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SnapshotLayout:
    """Tensor placement in the buffer plus the fragment geometry (k data rows of ``frag_len``)."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int
    k: int
    m: int
    frag_len: int

    @staticmethod
    def plan(tensors: dict[str, torch.Tensor], k: int, m: int) -> "SnapshotLayout":
        specs, offset = [], 0
        for name, t in tensors.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} is not supported by snapshots")
            n = t.numel() * t.element_size()
            specs.append(TensorSpec(name, dtype, tuple(t.shape), offset, n))
            offset = _align(offset + n)
        frag_len = _align(max(1, -(-offset // k)))
        return SnapshotLayout(tuple(specs), offset, k, m, frag_len)

    @property
    def buffer_len(self) -> int:
        return self.k * self.frag_len

    def matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        if len(tensors) != len(self.tensors):
            return False
        for spec, (name, t) in zip(self.tensors, tensors.items()):
            if spec.name != name or tuple(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in self.tensors],
            "nbytes": self.nbytes,
            "k": self.k,
            "m": self.m,
            "frag_len": self.frag_len,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SnapshotLayout":
        specs = tuple(TensorSpec(n, dt, tuple(sh), off, nb) for n, dt, sh, off, nb in d["tensors"])
        return SnapshotLayout(specs, d["nbytes"], d["k"], d["m"], d["frag_len"])


def stripes(tensors: dict[str, torch.Tensor], world: int) -> list[list[str]]:
    """Split a replica group's state into ``world`` contiguous runs of tensors of about equal bytes.

    Every replica computes the same split from the same (ordered) state, so replica i captures
    stripe i and the group captures each byte once.
    """
    sizes = [(n, t.numel() * t.element_size()) for n, t in tensors.items()]
    total = sum(b for _, b in sizes) or 1
    out: list[list[str]] = [[] for _ in range(world)]
    cum = 0
    for name, nbytes in sizes:
        out[min(world - 1, int((cum + nbytes / 2) * world // total))].append(name)
        cum += nbytes
    return out


def tensor_views(buffer: torch.Tensor, layout: SnapshotLayout) -> dict[str, torch.Tensor]:
    """Typed views of a uint8 buffer (no copy): write into them to stage, read them to restore."""
    out = {}
    for s in layout.tensors:
        raw = buffer[s.offset : s.offset + s.nbytes]
        out[s.name] = raw.view(_DTYPES[s.dtype]).view(s.shape)
    return out


def unpack(buffer: np.ndarray | torch.Tensor, layout: SnapshotLayout, copy: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of a snapshot buffer; ``copy=False`` returns views that alias the buffer."""
    t = torch.from_numpy(buffer) if isinstance(buffer, np.ndarray) else buffer
    t = t.reshape(-1)
    if t.numel() < layout.nbytes:
        raise ValueError(f"snapshot buffer holds {t.numel()} bytes, its layout needs {layout.nbytes}")
    views = tensor_views(t, layout)
    return {k: v.clone() for k, v in views.items()} if copy else views


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as JSON-able values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
