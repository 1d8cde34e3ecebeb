"""The memory tiers (device arena, host pool, disk slot file) and the one copy engine between them."""

from .arena import ArenaFull, DeviceArena
from .copy import TIERS, CopyEngine, Handle
from .disk import DiskFull, DiskSlots, round_up
from .host import ALIGN, DIRECT_IO_ALIGN, HostPool, HostPoolFull

__all__ = ["ALIGN", "ArenaFull", "CopyEngine", "DIRECT_IO_ALIGN", "DeviceArena", "DiskFull", "DiskSlots", "Handle",
           "HostPool", "HostPoolFull", "TIERS", "round_up"]
