"""Checkpoint settings: the `[checkpoint]` table of a job spec."""

from __future__ import annotations

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
class CheckpointConfig:
    every_steps: int = 10
    """Write a durable (disk) checkpoint every N steps; 0 turns durable checkpoints off."""
    keep: int = 2
    """How many complete checkpoints to keep; older ones are deleted after a newer one is durable."""
    dir: str = ""
    """Checkpoint folder; empty means <run_dir>/checkpoints."""
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
        if self.holder_bytes < 0:
            raise ValueError(f"holder_bytes={self.holder_bytes} must be >= 0 (0: 90% of /dev/shm free)")
