"""Shared-memory segment files: writing and reading them, who owns them, and reclaiming the dead's.

Every snapshot fragment is one file in ``/dev/shm`` named ``<prefix>-...`` where ``<prefix>``
(``tmck-<run>-n<i>[g<gen>]``) identifies the holder that owns it. tmpfs outlives processes, so a
holder records itself in ``<prefix>.owner`` (pid and process start time) before it creates any
segment; a holder starting later unlinks every segment whose owner is gone (a crashed driver, a
killed holder, an old run), so /dev/shm does not fill up until reboot.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import numpy as np
import xxhash

SEGMENT_PREFIX = "tmck-"
_PREFIX_RE = re.compile(r"^(tmck-[0-9A-Za-z]+-n\d+(?:g\d+)?)[-.]")


def shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def segment_glob(prefix: str) -> str:
    return os.path.join(shm_root(), f"{prefix}-*")


def shm_free_bytes() -> int:
    st = os.statvfs(shm_root())
    return st.f_bavail * st.f_frsize


def cleanup_segments(prefix: str) -> int:
    """Unlink a holder's segments and its owner record; returns how many segments."""
    n = 0
    for path in glob.glob(segment_glob(prefix)):
        try:
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            pass
    try:
        os.unlink(_owner_path(prefix))
    except FileNotFoundError:
        pass
    return n


def checksum(buf: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(np.ascontiguousarray(buf)).cast("B"))


def write_file(path: str, row: np.ndarray) -> None:
    """Write ``row`` into an existing (pre-allocated) segment file, in place."""
    view = memoryview(np.ascontiguousarray(row).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        off = 0
        while off < len(view):
            off += os.pwrite(fd, view[off:], off)
    finally:
        os.close(fd)


def read_file_into(path: str, out: np.ndarray) -> bool:
    """Read a segment into ``out``; False if it is shorter than ``out`` (truncated)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        off = 0
        while off < len(view):
            n = f.readinto(view[off:])
            if not n:
                return False
            off += n
    return True


# ---- ownership ---------------------------------------------------------------------------------
def _owner_path(prefix: str) -> str:
    return os.path.join(shm_root(), f"{prefix}.owner")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (pid reuse changes it); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # field 22 of stat(5); fields[0] is field 3
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def claim(prefix: str) -> None:
    """Record this process as the owner of ``prefix``'s segments (before it creates any)."""
    record = json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())})
    tmp = _owner_path(prefix) + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(record)
    os.replace(tmp, _owner_path(prefix))


def _owner_alive(prefix: str) -> bool:
    try:
        with open(_owner_path(prefix)) as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return record.get("start") is not None and _start_time(int(record["pid"])) == record["start"]


def reclaim_orphans() -> dict[str, int]:
    """Unlink the segments of every holder whose owner process is gone; {prefix: segments freed}."""
    prefixes = set()
    for path in glob.glob(os.path.join(shm_root(), f"{SEGMENT_PREFIX}*")):
        match = _PREFIX_RE.match(os.path.basename(path))
        if match:
            prefixes.add(match.group(1))
    return {p: cleanup_segments(p) for p in sorted(prefixes) if not _owner_alive(p)}
