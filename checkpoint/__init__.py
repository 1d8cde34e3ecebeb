"""trainmem.checkpoint: snapshots of training state and their storage tiers."""

from .config import CheckpointConfig
from .durable import DurableStore, LoadedCheckpoint

__all__ = ["CheckpointConfig", "DurableStore", "LoadedCheckpoint"]
