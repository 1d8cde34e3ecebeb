from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hypothesis import given, settings, strategies as st

from trainmem.runtime.config import DataConfig
from trainmem.runtime.data import build_corpus, open_corpus, stdlib_files


def test_stdlib_corpus_is_cached_once_and_memory_mapped(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    path = build_corpus(cfg)
    mtime = path.stat().st_mtime_ns
    assert build_corpus(cfg) == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    stream = open_corpus(cfg)
    expected = sum(f.stat().st_size + 2 for f in stdlib_files())
    assert len(stream) == expected
    assert stream.tokens.dtype == np.uint8 and stream.max_token < 256
    # a read-only view of the mapped file, the bytes pyarrow reads
    import pyarrow.ipc as ipc

    table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    assert np.array_equal(stream.tokens, table.column("tokens").to_numpy())
    assert not stream.tokens.flags.writeable


def test_text_and_parquet_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"hello world " * 50)
    pq.write_table(pa.table({"text": ["abc" * 40, "def" * 40]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"tokens": [[300, 301, 302] * 40]}), tmp_path / "c.parquet")
    cfg = DataConfig(source="files", paths=[str(txt), str(tmp_path / "b.parquet"), str(tmp_path / "c.parquet")],
                     cache_dir=str(tmp_path / "cache"))
    stream = open_corpus(cfg)
    assert stream.max_token == 302  # token ids kept, not bytes
    assert bytes(stream.tokens[:5].astype(np.uint8)) == b"hello"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(1, 10**6), world=st.integers(1, 8))
def test_batches_are_a_pure_function_of_seed_step_rank_world(seed, step, world, tmp_path_factory):
    stream = _stream(tmp_path_factory)
    kw = dict(seed=seed, step=step, world=world, batch_size=3, seq_len=16)
    x0, y0 = stream.batch(rank=0, **kw)
    x1, y1 = stream.batch(rank=0, **kw)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are inputs shifted by one
    if world > 1:
        xr, _ = stream.batch(rank=world - 1, **kw)
        assert not torch.equal(x0, xr)


_CACHE = {}


def _stream(factory):
    if "s" not in _CACHE:
        _CACHE["s"] = open_corpus(DataConfig(cache_dir=str(factory.mktemp("corpus"))))
    return _CACHE["s"]


def test_stdlib_files_are_the_stdlib_without_walking_site_packages(monkeypatch):
    """The default corpus lists the same files as a plain filtered rglob (so cached corpora stay valid),
    but never descends into site-packages, which every rank would otherwise walk at start."""
    import os
    import sysconfig

    from trainmem.runtime import data

    root = Path(sysconfig.get_paths()["stdlib"])
    expect = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    visited: list[str] = []
    real_walk = os.walk

    def spy(top, *args, **kwargs):
        for folder, subdirs, names in real_walk(top, *args, **kwargs):
            visited.append(folder)
            yield folder, subdirs, names

    monkeypatch.setattr(data.os, "walk", spy)
    assert data.stdlib_files() == expect and len(expect) > 500
    assert visited and not any("site-packages" in Path(v).parts for v in visited)
