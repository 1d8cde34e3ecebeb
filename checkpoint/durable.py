"""The durable tier: a checkpoint per step folder, safetensors + JSON manifest, atomic and checksummed.

Layout::

    <dir>/step-00000010/state.safetensors
    <dir>/step-00000010/manifest.json     {"step", "files": {name: {"bytes", "sha256"}}, "meta"}
    <dir>/LATEST                           "10" (written last: a step is never "latest" before it is durable)

A step folder is written under a temporary name, every file fsynced, then renamed; LATEST is
replaced the same way. Loading verifies each file's sha256 before parsing it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STATE_FILE = "state.safetensors"
_MANIFEST = "manifest.json"
_LATEST = "LATEST"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file is missing, torn or fails its checksum; the message names the file."""


@dataclass
class LoadedCheckpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final`` so that ``final`` never stops existing.

    A step that is written again (a replay after a restore from an older step) may be the one a
    LATEST marker names: swap the two folders atomically (``renameat2(RENAME_EXCHANGE)``), then
    delete the old one, now under the temporary name. A crash at any point leaves ``final`` whole.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    rc = _libc.renameat2(-100, os.fsencode(tmp), -100, os.fsencode(final), _RENAME_EXCHANGE)  # AT_FDCWD
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, f"cannot swap {tmp} into {final}: {os.strerror(err)}")
        # No atomic exchange here (old kernel or filesystem): the old copy is replaced in two renames.
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        tmp = aside
    shutil.rmtree(tmp, ignore_errors=True)


def read_step_marker(marker: Path) -> int | None:
    """The step a LATEST-style marker file names; None if there is none yet."""
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointCorrupt(f"{marker}: expected a step number, found {text[:40]!r}")
    return int(text)


def read_manifest(path: Path, fmt: str, step: int) -> dict[str, Any]:
    """A step's JSON manifest, checked to be of format ``fmt`` and of ``step``; CheckpointCorrupt names the file."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != fmt or manifest.get("step") != step:
        raise CheckpointCorrupt(f"{path}: not a {fmt} manifest of step {step}")
    return manifest


class DurableStore:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state_path = tmp / _STATE_FILE
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(state_path))
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "format": "trainmem-durable-v1",
            "step": step,
            "files": {_STATE_FILE: {"bytes": state_path.stat().st_size, "sha256": _sha256(state_path)}},
            "meta": meta,
        }
        atomic_write_text(tmp / _MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        replace_dir(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        # LATEST names the newest durable step; a replayed older save does not move it back.
        atomic_write_text(self.root / _LATEST, str(max(self.steps())))
        return final

    def _prune(self) -> None:
        steps = self.steps()
        for step in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        out = []
        for p in self.root.glob("step-*"):
            if (p / _MANIFEST).exists():
                try:
                    out.append(int(p.name.split("-", 1)[1]))
                except ValueError:
                    continue
        return sorted(out)

    def latest_step(self) -> int | None:
        """The step named by LATEST, i.e. the newest checkpoint known durable."""
        return read_step_marker(self.root / _LATEST)

    def load(self, step: int | None = None) -> LoadedCheckpoint | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        folder = self.step_dir(step)
        manifest = read_manifest(folder / _MANIFEST, "trainmem-durable-v1", step)
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.exists():
                raise CheckpointCorrupt(f"{path}: listed in the manifest but missing")
            if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
                raise CheckpointCorrupt(f"{path}: checksum mismatch (torn or corrupted write)")
        tensors = load_file(str(folder / _STATE_FILE))
        return LoadedCheckpoint(step=step, tensors=tensors, meta=manifest["meta"])
