"""``[placement]``: parameters, gradients and optimizer state in chunks over device, host and disk."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

OPTIMIZERS = ("auto", "torch", "torch_fused", "deepspeed")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str, key: str) -> int:
    """``2GiB``, ``512 MiB``, ``1.5GB`` or an integer number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be a size such as '2GiB' or a number of bytes")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{key}={value!r} is not a size (write e.g. '2GiB', '512MiB', '1.5GB' or bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"{key}={value!r} must be > 0 bytes")
    return n


def physical_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_limit_bytes() -> int | None:
    """This process's cgroup memory limit (v2 or v1), or None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def host_limit_bytes() -> tuple[int, str]:
    """The most host memory this process can have, and what sets it."""
    ram, cg = physical_ram_bytes(), cgroup_limit_bytes()
    if cg is not None and cg < ram:
        return cg, "the cgroup memory limit"
    return ram, "physical RAM"


DEVICE_AUTO_FRACTION = 0.9


def device_total_bytes(index: int = 0) -> int:
    """Total memory of GPU ``index`` as NVML reports it; ValueError with NVML's reason where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:
        raise ValueError(f"device_bytes='auto' reads the GPU's total memory from NVML, which is unavailable here "
                         f"({type(e).__name__}: {e}); fix: give a size such as '2GiB'") from None


@dataclass(kw_only=True)
class PlacementConfig:
    device_bytes: int | str | None = None
    """Hard budget for parameter/gradient chunks on the device (CUDA memory on a GPU; on CPU a byte-capped
    arena that layers compute from). A size such as '2GiB' or bytes, or 'auto': 90% of GPU 0's total memory as
    NVML reports it. Setting it turns chunked placement on."""
    host_bytes: int | str | None = None
    """Hard budget for this rank's chunk shards and disk staging in host RAM (pinned on CUDA). Unset: what the
    plan needs without a disk tier, refused if above physical RAM or the cgroup limit."""
    disk_path: str = ""
    """Directory for the optional third tier (one preallocated slot file per rank). Empty: device + host only."""
    disk_bytes: int | str | None = None
    """Budget for the slot file under disk_path (needed with disk_path)."""
    chunk_bytes: int | str = "auto"
    """Chunk size: 'auto' searches the size that wastes the fewest bytes, or a size. A chunk holds world-size
    shards and a shard holds whole parameters, so a chunk is at least world x the largest parameter."""
    optimizer: str = "auto"
    """Host-side AdamW kernel: torch (the kernel torch.optim.AdamW runs on CPU; bitwise equal to it) | torch_fused
    (torch's fused CPU Adam) | deepspeed (DeepSpeedCPUAdam, JIT-built once) | auto (deepspeed where its extension
    builds, else torch_fused)."""
    prefetch_chunks: int = 1
    """How many upcoming moments of the recorded trace to prefetch chunks for (0: fetch on demand only)."""
    micro_batches: int = 1
    """Each rank splits its batch into this many micro-batches and accumulates their gradients in global order,
    so W ranks x K micro-batches is bitwise the same arithmetic as 1 rank x W*K micro-batches."""

    def __post_init__(self) -> None:
        if self.device_bytes == "auto":
            self.device_bytes = int(device_total_bytes() * DEVICE_AUTO_FRACTION)
        for key in ("device_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, key)
            if value is not None:
                parse_bytes(value, key)
        if self.chunk_bytes != "auto":
            n = parse_bytes(self.chunk_bytes, "chunk_bytes")
            if n % 4096:
                raise ValueError(f"chunk_bytes={self.chunk_bytes!r} must be a multiple of 4096 bytes "
                                 f"(the smallest that works near it: {-(-n // 4096) * 4096})")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.prefetch_chunks < 0:
            raise ValueError(f"prefetch_chunks={self.prefetch_chunks} must be >= 0 (the smallest that works: 0)")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches} must be >= 1 (the smallest that works: 1)")
        if not self.enabled:
            if self.host_bytes is not None or self.disk_path or self.disk_bytes is not None:
                raise ValueError("device_bytes=... is missing: [placement] needs device_bytes (e.g. '2GiB') to turn on")
            return
        if bool(self.disk_path) != (self.disk_bytes is not None):
            key = "disk_bytes" if self.disk_path else "disk_path"
            raise ValueError(f"{key}=... is missing: disk_path and disk_bytes go together")
        if self.host_bytes is not None:
            limit, what = host_limit_bytes()
            if self.host_budget > limit:
                raise ValueError(f"host_bytes={self.host_bytes!r} is above {what} ({limit} bytes): "
                                 f"the largest value that works is {limit}")
        if self.disk_path:
            self._check_disk()

    def _check_disk(self) -> None:
        path = Path(self.disk_path).expanduser()
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise ValueError(f"disk_path={self.disk_path!r} is not a writable directory")
        free = shutil.disk_usage(probe).free
        if self.disk_budget > free:
            raise ValueError(f"disk_bytes={self.disk_bytes!r} is more than the {free} bytes free under "
                             f"disk_path={self.disk_path!r}: the largest value that works there is {free}")

    @property
    def enabled(self) -> bool:
        return self.device_bytes is not None

    @property
    def device_budget(self) -> int:
        return parse_bytes(self.device_bytes, "device_bytes")

    @property
    def host_budget(self) -> int | None:
        return None if self.host_bytes is None else parse_bytes(self.host_bytes, "host_bytes")

    @property
    def disk_budget(self) -> int:
        return 0 if self.disk_bytes is None else parse_bytes(self.disk_bytes, "disk_bytes")

    @property
    def chunk_budget(self) -> int | None:
        return None if self.chunk_bytes == "auto" else parse_bytes(self.chunk_bytes, "chunk_bytes")
