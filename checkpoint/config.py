"""Checkpoint settings: the `[checkpoint]` table of a job spec."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ECConfig:
    k: int = 2
    """Data fragments per rank snapshot (Reed-Solomon, ISA-L); any k of the k+m fragments rebuild it."""
    m: int = 1
    """Parity fragments per rank snapshot: any m lost nodes are survivable when there are >= k+m nodes."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        if self.m < 0:
            raise ValueError(f"m={self.m} must be >= 0")
        if self.k + self.m > 32:
            raise ValueError(f"k={self.k} with m={self.m}: k + m must be <= 32 (one fragment per node)")


@dataclass(kw_only=True)
class StorageConfig:
    """How to reach ``checkpoint.dir`` when it is ``s3://bucket/prefix`` (unused for a local path)."""

    endpoint: str = ""
    """S3 endpoint URL, e.g. "http://127.0.0.1:8333" (MinIO, SeaweedFS); empty: AWS_ENDPOINT_URL, else AWS's own."""
    region: str = ""
    """S3 region; empty: AWS_REGION or AWS_DEFAULT_REGION, else "us-east-1"."""
    access_key_id: str = ""
    """Access key; empty: AWS_ACCESS_KEY_ID (or the SDK's default chain)."""
    secret_access_key: str = ""
    """Secret key; empty: AWS_SECRET_ACCESS_KEY. Prefer the variable: job files are copied into run_dir/spec.json."""
    session_token: str = ""
    """Temporary credentials' session token; empty: AWS_SESSION_TOKEN."""
    connect_timeout_s: float = 10.0
    """Deadline to open a connection to the endpoint."""
    request_timeout_s: float = 60.0
    """Deadline for one request (a part of an upload, a read)."""
    max_attempts: int = 3
    """Attempts per request (AWS standard retry strategy) before an error reaches the checkpoint code."""
    check_timeout_s: float = 60.0
    """Deadline for the start-up check that every node reads the same checkpoint location."""

    def __post_init__(self) -> None:
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint={self.endpoint!r} must start with http:// or https://")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ValueError("access_key_id=... and secret_access_key=... go together: set both or neither "
                             "(or leave both empty and export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        for name in ("connect_timeout_s", "request_timeout_s", "check_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be >= 1")

    def resolved(self) -> "StorageConfig":
        """This config with empty fields filled from the standard AWS_* variables of this process."""
        env = os.environ.get
        return dataclasses.replace(
            self,
            endpoint=self.endpoint or env("AWS_ENDPOINT_URL_S3", "") or env("AWS_ENDPOINT_URL", ""),
            region=self.region or env("AWS_REGION", "") or env("AWS_DEFAULT_REGION", "") or "us-east-1",
            access_key_id=self.access_key_id or env("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=self.secret_access_key or env("AWS_SECRET_ACCESS_KEY", ""),
            session_token=self.session_token or env("AWS_SESSION_TOKEN", ""),
        )


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 10
    """Write a durable (disk) checkpoint every N steps; 0 turns durable checkpoints off."""
    keep: int = 2
    """How many complete checkpoints to keep; older ones are deleted after a newer one is durable."""
    dir: str = ""
    """Checkpoint location: a local folder (one node, or a mount every node shares) or s3://bucket/prefix; empty means <run_dir>/checkpoints."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """[checkpoint.storage] endpoint, region and credentials when dir is s3://..."""
    snapshot_every: int = 0
    """Take an in-memory, erasure-coded snapshot every N steps (1 = every step); 0 turns them off."""
    ec: ECConfig = field(default_factory=ECConfig)
    """[checkpoint.ec] erasure coding of in-memory snapshots across nodes."""
    flush_every: int = 0
    """Flush every Nth complete in-memory snapshot to <dir>/snap-* (zstd, in the background); 0: never."""
    holder_timeout_s: float = 30.0
    """Deadline for snapshot-holder calls (store, fetch, restore); a holder slower than this is left out until it answers again."""
    holder_bytes: int = 0
    """Shared-memory bytes each node's snapshot holder may use; 0 = 90% of /dev/shm free at start. Checked against /dev/shm at start."""
    snapshot_strict: bool = False
    """Wait for the previous snapshot to be stored instead of skipping this step's (event snapshot_skipped)."""
    stripe_replicas: bool = True
    """Data-parallel replicas hold the same state: each captures 1/W of it, so the group snapshots each byte once."""
    scrub_every_s: float = 30.0
    """Holders re-verify the newest committed snapshot this often (lowest CPU priority); bad fragments are re-encoded. 0: off."""
    flush_min_ratio: float = 1.15
    """The flush tier compresses with zstd only if the first flush compressed at least this much; else it stores raw bytes."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps={self.every_steps} must be >= 0 (0 turns checkpoints off)")
        if self.keep < 1:
            raise ValueError(f"keep={self.keep} must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every={self.snapshot_every} must be >= 0 (0 turns snapshots off)")
        if self.flush_every < 0:
            raise ValueError(f"flush_every={self.flush_every} must be >= 0 (0 never flushes)")
        if self.flush_every and not self.snapshot_every:
            raise ValueError(f"flush_every={self.flush_every} needs snapshot_every > 0 (it flushes snapshots)")
        if not self.holder_timeout_s > 0:
            raise ValueError(f"holder_timeout_s={self.holder_timeout_s} must be > 0")
        if self.scrub_every_s < 0:
            raise ValueError(f"scrub_every_s={self.scrub_every_s} must be >= 0 (0 turns the scrub off)")
        if self.flush_min_ratio < 1:
            raise ValueError(f"flush_min_ratio={self.flush_min_ratio} must be >= 1 (1: always compress)")
        if "://" in self.dir:
            bucket = self.dir[len("s3://"):].split("/", 1)[0] if self.dir.startswith("s3://") else ""
            if not bucket:
                raise ValueError(f"dir={self.dir!r} must be a local path or s3://bucket/prefix")
            if self.flush_every:
                raise ValueError(f"flush_every={self.flush_every} writes the flush tier to a local folder, and "
                                 f"dir={self.dir!r} is on S3 (fix: flush_every = 0; durable checkpoints go to S3)")
        if self.holder_bytes < 0:
            raise ValueError(f"holder_bytes={self.holder_bytes} must be >= 0 (0: 90% of /dev/shm free)")
