"""The durable flush tier: every Nth complete in-memory snapshot, zstd-compressed on disk, lazily.

Layout (one folder per flushed step, written under a temporary name, fsynced, then renamed)::

    <dir>/snap-00000042/rank-00000.zst      snapshot bytes of rank 0, zstandard (or rank-00000.raw, as is)
    <dir>/snap-00000042/manifest.json       {"format", "step", "world", "ranks": {r: {file, codec, raw_bytes,
                                             raw_xxh3, stored_bytes, stored_sha256, layout, meta}}}
    <dir>/SNAPSHOT-LATEST                    "42", replaced only after the folder is durable

Files are raw bytes + JSON; nothing is ever unpickled. Loading verifies both checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash
import zstandard

from .durable import CheckpointCorrupt, fsync_dir, atomic_write_text, read_manifest, read_step_marker, replace_dir
from .layout import SnapshotLayout

_FORMAT = "trainmem-snapshot-v2"
_LATEST = "SNAPSHOT-LATEST"
_CHUNK = 1 << 24


@dataclass
class FlushedRank:
    layout: SnapshotLayout
    meta: dict[str, Any]
    buffer: np.ndarray


@dataclass
class FlushedSnapshot:
    step: int
    world: int
    ranks: dict[int, FlushedRank]


class _HashingFile:
    """A file object that sha256-hashes what is written through it (so the file is never read back)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class FlushStore:
    """Reads and writes flushed snapshots under ``root``; keeps the newest ``keep``.

    fp32 weights barely compress (~1.08x with zstd): the first flush measures the ratio, and below
    ``min_ratio`` this store writes raw bytes from then on instead of spending CPU on zstd.
    """

    def __init__(self, root: str | Path, keep: int = 2, level: int = 1, min_ratio: float = 1.0):
        self.root, self.keep, self.level, self.min_ratio = Path(root), keep, level, min_ratio
        self.codec: str | None = None if min_ratio > 1.0 else "zstd"
        self.measured_ratio: float | None = None

    def _dir(self, step: int) -> Path:
        return self.root / f"snap-{step:08d}"

    def _write_rank(self, tmp: Path, rank: int, raw: memoryview) -> dict[str, Any]:
        codec = self.codec or "zstd"
        name = f"rank-{rank:05d}.{'zst' if codec == 'zstd' else 'raw'}"
        with open(tmp / name, "wb") as f:
            out = _HashingFile(f)
            if codec == "zstd":
                writer = zstandard.ZstdCompressor(level=self.level).stream_writer(out, closefd=False)
                for off in range(0, len(raw), _CHUNK):
                    writer.write(raw[off : off + _CHUNK])
                writer.flush(zstandard.FLUSH_FRAME)
            else:
                for off in range(0, len(raw), _CHUNK):
                    out.write(raw[off : off + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        if self.codec is None:  # the first flush decides for the rest of the job
            self.measured_ratio = len(raw) / max(1, out.n)
            self.codec = "zstd" if self.measured_ratio >= self.min_ratio else "raw"
        return {"file": name, "codec": codec, "raw_bytes": len(raw), "raw_xxh3": xxhash.xxh3_128_hexdigest(raw),
                "stored_bytes": out.n, "stored_sha256": out.sha.hexdigest()}

    def write(self, step: int, ranks: dict[int, FlushedRank], world: int | None = None) -> Path:
        """Flush ``ranks`` (old rank -> snapshot; replicas need only one) of a job of ``world`` ranks."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-snap-{step:08d}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        entries = {}
        for rank, r in sorted(ranks.items()):
            raw = memoryview(r.buffer.reshape(-1)[: r.layout.nbytes]).cast("B")
            entries[str(rank)] = {**self._write_rank(tmp, rank, raw), "layout": r.layout.to_json(), "meta": r.meta}
        manifest = {"format": _FORMAT, "step": step, "world": world or len(ranks), "ranks": entries}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, sort_keys=True))
        fsync_dir(tmp)
        final = self._dir(step)
        replace_dir(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / _LATEST, str(step))
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self._dir(old), ignore_errors=True)
        return final

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.root.glob("snap-*") if (p / "manifest.json").exists()
                      and p.name[5:].isdigit())

    def latest_step(self) -> int | None:
        return read_step_marker(self.root / _LATEST)

    def load_manifest_world(self, step: int) -> int:
        return int(read_manifest(self._dir(step) / "manifest.json", _FORMAT, step)["world"])

    def load(self, step: int | None = None, ranks: list[int] | None = None) -> FlushedSnapshot | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        folder = self._dir(step)
        manifest = read_manifest(folder / "manifest.json", _FORMAT, step)
        out = {}
        for key, e in manifest["ranks"].items():
            if ranks is not None and int(key) not in ranks:
                continue
            out[int(key)] = self._load_rank(folder, e)
        return FlushedSnapshot(step, manifest["world"], out)

    def _load_rank(self, folder: Path, e: dict[str, Any]) -> FlushedRank:
        file = folder / e["file"]
        if not file.exists() or file.stat().st_size != e["stored_bytes"]:
            raise CheckpointCorrupt(f"{file}: missing or truncated (expected {e['stored_bytes']} bytes)")
        sha = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha.update(chunk)
        if sha.hexdigest() != e["stored_sha256"]:
            raise CheckpointCorrupt(f"{file}: sha256 mismatch (corrupted on disk)")
        layout = SnapshotLayout.from_json(e["layout"])
        buffer = np.zeros(layout.buffer_len, dtype=np.uint8)
        with open(file, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f) if e["codec"] == "zstd" else f
            view, off = memoryview(buffer), 0
            while off < e["raw_bytes"]:
                n = reader.readinto(view[off : e["raw_bytes"]])
                if n == 0:
                    raise CheckpointCorrupt(f"{file}: decoded to {off} bytes, manifest says {e['raw_bytes']}")
                off += n
        if xxhash.xxh3_128_hexdigest(memoryview(buffer)[: e["raw_bytes"]]) != e["raw_xxh3"]:
            raise CheckpointCorrupt(f"{file}: content checksum mismatch after decoding")
        return FlushedRank(layout, e["meta"], buffer)


class SnapshotFlusher:
    """Flushes a complete snapshot every ``every_steps`` steps in a background thread; never blocks training.

    ``fetch(step, rank) -> FlushedRank`` reads one rank's snapshot (from holders); ``pin(step, on)``
    keeps holders from freeing a step while it is read. Commits may skip steps, so the newest
    complete step is flushed once it crosses the next multiple of ``every_steps``; a flush still
    running when the next is due makes that one wait for the next crossing (lazy: newest wins).
    """

    def __init__(self, store: FlushStore, every_steps: int, world: int,
                 fetch: Callable[[int, int], FlushedRank], events: Callable[[dict], None] | None = None,
                 pin: Callable[[int, bool], None] | None = None, ranks: list[int] | None = None):
        """``ranks``: the ranks whose snapshots are written (one per replica group); default all."""
        self.store, self.every_steps, self.world, self.fetch = store, every_steps, world, fetch
        self.ranks = list(range(world)) if ranks is None else list(ranks)
        self._events = events or (lambda e: None)
        self._pin = pin or (lambda step, on: None)
        self._thread: threading.Thread | None = None
        self._bucket = 0
        self.flushed: list[int] = []
        self.error: BaseException | None = None

    def on_complete(self, step: int) -> bool:
        """Call with each newly complete step; starts a flush when one is due. True if started."""
        bucket = step // self.every_steps if self.every_steps > 0 else 0
        if bucket <= self._bucket or (self._thread and self._thread.is_alive()):
            return False
        self._bucket = bucket
        self._pin(step, True)  # before the thread starts: the next commit must not free it
        self._thread = threading.Thread(target=self._run, args=(step,), name=f"snapshot-flush-{step}", daemon=True)
        self._thread.start()
        return True

    def _run(self, step: int) -> None:
        try:
            ranks = {r: self.fetch(step, r) for r in self.ranks}
            path = self.store.write(step, ranks, self.world)
            self.flushed.append(step)
            self._events({"event": "checkpoint.flushed", "step": step, "path": str(path)})
        except BaseException as e:  # reported, and the next due flush tries again
            self.error = e
            self._events({"event": "checkpoint.flush_failed", "step": step, "error": f"{type(e).__name__}: {e}"})
        finally:
            try:
                self._pin(step, False)
            except Exception:  # holders gone: nothing left to release
                pass

    def wait(self, timeout_s: float = 300.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"snapshot flush thread still running after {timeout_s:g}s")
