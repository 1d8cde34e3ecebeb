"""Checkpoint settings: the `[checkpoint]` table of a job spec."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 10
    """Write a durable (disk) checkpoint every N steps; 0 turns durable checkpoints off."""
    keep: int = 2
    """How many complete checkpoints to keep; older ones are deleted after a newer one is durable."""
    dir: str = ""
    """Checkpoint folder; empty means <run_dir>/checkpoints."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps={self.every_steps} must be >= 0 (0 turns checkpoints off)")
        if self.keep < 1:
            raise ValueError(f"keep={self.keep} must be >= 1")
