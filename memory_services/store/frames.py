"""The on-disk pieces of the memory store: framed Arrow records in append-only segments, a
manifest switched atomically, and compacted base files.

A *frame* is one committed transaction::

    b"TMF1" | payload length (u32 LE) | crc32 of payload (u32 LE) | payload

where the payload is a self-contained Arrow IPC stream (schema + one record batch); the
transaction's write counter, key-value changes and idempotency records ride in the schema
metadata. A writer appends a frame with one ``write`` and ``fdatasync``s before it acknowledges,
so a SIGKILL at any point leaves every acknowledged frame whole. A frame cut short by a crash
is always the last one of the active segment: readers treat it as "not there yet", the next
writer (holding the lock) truncates it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from trainmem.checkpoint import atomic_write_bytes, fsync_dir  # noqa: F401 (the store's writes, re-exported)

MAGIC = b"TMF1"
_HEADER = struct.Struct("<4sII")
HEADER_BYTES = _HEADER.size
TXN_KEY = b"trainmem.txn"
MANIFEST = "MANIFEST.json"
FORMAT = "trainmem-memory-store-v2"


class StoreCorrupt(RuntimeError):
    """A store file is damaged somewhere other than a torn last frame; the message names file and offset."""


def entry_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("namespace", pa.string()),
            ("text", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("metadata", pa.string()),
            ("created", pa.float64()),
            ("updated", pa.float64()),
            ("version", pa.int64()),
            ("seq", pa.int64()),
            ("deleted", pa.bool_()),
        ]
    )


def encode_frame(batch: pa.RecordBatch, txn: dict[str, Any]) -> bytes:
    batch = batch.replace_schema_metadata({TXN_KEY: json.dumps(txn, separators=(",", ":")).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    payload = sink.getvalue().to_pybytes()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> tuple[pa.RecordBatch, dict[str, Any]]:
    reader = pa.ipc.open_stream(payload)
    txn = json.loads((reader.schema.metadata or {}).get(TXN_KEY, b"{}"))
    (batch,) = list(reader)  # every frame holds exactly one batch (empty for key-value-only changes)
    return batch.replace_schema_metadata(None), txn


@dataclass
class FrameScan:
    frames: list[tuple[pa.RecordBatch, dict[str, Any]]] = field(default_factory=list)
    end: int = 0
    """Offset just past the last whole frame read."""
    tail: str = ""
    """What follows ``end``: "" (nothing), "partial" (a frame cut short by a crash, or still being
    written: safe to truncate under the writers' lock) or "corrupt" (a whole-length frame that fails
    its checksum: never truncated silently)."""


def read_frames(path: Path, offset: int) -> FrameScan:
    """Every whole frame of ``path`` from ``offset`` on (a segment is bounded, so it is read at once)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    scan, pos = FrameScan(end=offset), 0
    while pos < len(data):
        rest = len(data) - pos
        if rest < HEADER_BYTES:
            scan.tail = "partial"
            break
        magic, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + HEADER_BYTES
        if magic != MAGIC:
            # Zeros to the end are an unwritten tail (a crash before the data reached the file).
            scan.tail = "partial" if not data[pos:].strip(b"\0") else "corrupt"
            break
        if start + length > len(data):
            scan.tail = "partial"
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            scan.tail = "corrupt"
            break
        scan.frames.append(decode_payload(payload))
        pos = start + length
        scan.end = offset + pos
    return scan


@dataclass
class Manifest:
    store_id: str
    dim: int
    generation: int = 0
    base: str | None = None
    base_seq: int = 0
    segments: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "store_id": self.store_id, "dim": self.dim, "generation": self.generation,
                "base": self.base, "base_seq": self.base_seq, "segments": self.segments}

    def write(self, directory: Path) -> None:
        atomic_write_bytes(directory / MANIFEST, json.dumps(self.to_json(), indent=1).encode())

    @staticmethod
    def read(directory: Path) -> "Manifest":
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreCorrupt(f"{path}: not valid JSON ({e})") from None
        if raw.get("format") != FORMAT:
            raise StoreCorrupt(f"{path}: not a {FORMAT} manifest (format={raw.get('format')!r})")
        return Manifest(raw["store_id"], int(raw["dim"]), int(raw["generation"]), raw["base"],
                        int(raw["base_seq"]), list(raw["segments"]))


def write_base(path: Path, table: pa.Table, meta: dict[str, Any]) -> None:
    """A compacted base: one Arrow IPC file (memory-mapped on load), metadata in its schema."""
    table = table.replace_schema_metadata({TXN_KEY: json.dumps(meta, separators=(",", ":")).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_base(path: Path) -> tuple[list[pa.RecordBatch], dict[str, Any]]:
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    meta = json.loads((reader.schema.metadata or {}).get(TXN_KEY, b"{}"))
    batches = [reader.get_batch(i).replace_schema_metadata(None) for i in range(reader.num_record_batches)]
    return batches, meta
