"""trainmem.checkpoint: snapshots of training state and their storage tiers.

Tiers, fastest first: in-memory erasure-coded snapshots kept by per-node holders
(:class:`SnapshotWriter` → :class:`SnapshotHolder` shared memory, committed by
:class:`SnapshotCoordinator`; in a job: :class:`SnapshotService` + :class:`RankSnapshots`),
the zstd flush tier (:class:`FlushStore`), and the durable safetensors tier (:class:`DurableStore`),
which writes to a :class:`Location`: a local folder or s3://bucket/prefix (:class:`StorageConfig`);
:func:`check_location_shared` checks at start that every node sees the same one.
A restart walks every tier's candidates newest step first (:mod:`.restore`) until every rank
reads an intact one.

Names are imported on first use, so a holder process (or ``trainmem config``) does not pay
for torch when it only needs numpy and Ray.
"""

from trainmem.lazy import lazy_getattr

from .config import CheckpointConfig, ECConfig, StorageConfig

_WHERE = {
    "CheckpointCorrupt": "durable", "DurableStore": "durable", "LoadedCheckpoint": "durable",
    "SnapshotWriter": "capture", "SnapshotError": "capture", "Traffic": "capture",
    "SnapshotCoordinator": "coordinator",
    "SnapshotHolder": "holder", "HolderFull": "holder",
    "HolderSet": "holder_set", "HolderStartError": "holder_set", "start_holders": "holder_set",
    "cleanup_segments": "segments", "reclaim_orphans": "segments",
    "RSCodec": "isal", "ErasureError": "isal",
    "SnapshotLayout": "layout", "capture_rng_states": "layout", "restore_rng_states": "layout", "unpack": "layout",
    "stripes": "layout",
    "assignment": "placement", "node_loss_tolerance": "placement",
    "FetchedSnapshot": "recovery", "SnapshotUnavailable": "recovery", "fetch_snapshot": "recovery",
    "reencode": "recovery",
    "FlushStore": "flush", "FlushedRank": "flush", "FlushedSnapshot": "flush", "SnapshotFlusher": "flush",
    "dp_source_rank": "reshard", "flat_shard": "reshard", "reshard_flat": "reshard", "reshard_states": "reshard",
    "Candidate": "restore", "disk_candidates": "restore", "durable_reader": "restore", "existing_state": "restore",
    "flush_reader": "restore", "ordered": "restore",
    "Location": "storage", "is_uri": "storage", "atomic_write_bytes": "storage", "fsync_dir": "storage",
    "LocationNotShared": "location_check", "check_location_shared": "location_check",
    "SnapshotService": "session", "RankSnapshots": "rank",
    "flatten_training_state": "state", "restore_training_state": "state",
}

__all__ = ["CheckpointConfig", "ECConfig", "StorageConfig", *_WHERE]

__getattr__ = lazy_getattr(__name__, _WHERE)
