"""Corpus → one token stream cached as an Arrow IPC file, memory-mapped; deterministic batches.

The default corpus is this interpreter's standard library source (every ``.py`` under
``sysconfig.get_paths()["stdlib"]``, sorted), as bytes. Users may name text files, or
Parquet/Arrow files with a ``text`` (strings, UTF-8 bytes) or ``tokens`` (integer ids) column.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from .config import DataConfig

_DOC_SEPARATOR = b"\n\n"


def stdlib_files() -> list[Path]:
    """Every ``.py`` of the standard library, sorted. site-packages is pruned from the walk, not
    filtered after it: it can hold far more than the stdlib, and every rank lists these at start."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d != "site-packages"]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(p for p in found if p.is_file())


def _source_files(cfg: DataConfig) -> list[Path]:
    return stdlib_files() if cfg.source == "stdlib" else [Path(p) for p in cfg.paths]


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256(b"trainmem-corpus-v1")
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _tokens_of(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow", ".feather", ".ipc"):
        table = pq.read_table(path) if suffix == ".parquet" else _read_arrow(path)
        if "tokens" in table.column_names:
            col = table.column("tokens").combine_chunks()
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                col = col.flatten()
            return col.to_numpy(zero_copy_only=False).astype(np.int32)
        if "text" in table.column_names:
            texts = table.column("text").to_pylist()
            return np.frombuffer(_DOC_SEPARATOR.join(t.encode("utf-8") for t in texts if t), dtype=np.uint8)
        raise ValueError(f"{path}: needs a 'text' or 'tokens' column, has {table.column_names}")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        try:
            return ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return ipc.open_stream(source).read_all()


def _write_atomic_ipc(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    table = pa.table({"tokens": pa.array(tokens)})
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_corpus(cfg: DataConfig) -> Path:
    """Tokenize once into ``cache_dir/corpus-<fingerprint>.arrow``; later calls reuse it."""
    files = _source_files(cfg)
    if not files:
        raise ValueError(f"data.source={cfg.source!r}: no input files found")
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"corpus-{_fingerprint(files)}.arrow"
    if out.exists():
        return out
    parts = [_tokens_of(f) for f in files]
    wide = any(p.dtype != np.uint8 for p in parts)
    sep = np.frombuffer(_DOC_SEPARATOR, dtype=np.uint8)
    pieces = [x for p in parts for x in (p, sep)]
    tokens = np.concatenate([p.astype(np.int32) for p in pieces] if wide else pieces)
    _write_atomic_ipc(out, tokens)
    return out


class TokenStream:
    """A memory-mapped token array; every batch is a pure function of (seed, step, rank, world)."""

    def __init__(self, path: Path):
        self._mmap = pa.memory_map(str(path), "r")
        column = ipc.open_file(self._mmap).read_all().column("tokens").combine_chunks()
        if column.null_count:
            raise ValueError(f"{path}: the tokens column has nulls (fix: delete the file, it is rebuilt)")
        # A view of the mapped bytes. Array.to_numpy(zero_copy_only=True) returns the same view but
        # spends ~0.2 CPU-s on a 30M-token corpus, and every trainer start paid it.
        dtype = np.dtype(column.type.to_pandas_dtype())
        self.tokens = np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column),
                                    offset=column.offset * dtype.itemsize)
        self.tokens.setflags(write=False)  # the map is read-only: a write would crash, not raise

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_token(self) -> int:
        return int(self.tokens.max())

    def batch(
        self, *, seed: int, step: int, rank: int, world: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, shape (batch_size, seq_len), int64."""
        span = seq_len + 1
        if len(self.tokens) <= span:
            raise ValueError(f"corpus has {len(self.tokens)} tokens, fewer than seq_len+1={span}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x7A11])))
        starts = rng.integers(0, len(self.tokens) - span, size=world * batch_size)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        rows = np.stack([self.tokens[s : s + span] for s in mine]).astype(np.int64)
        xy = torch.from_numpy(rows)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def open_corpus(cfg: DataConfig) -> TokenStream:
    return TokenStream(build_corpus(cfg))
