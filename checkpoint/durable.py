"""The durable tier: a checkpoint per step folder, safetensors + JSON manifest, atomic and checksummed.

Layout (a local folder, or objects under ``s3://bucket/prefix``, see :mod:`.storage`)::

    <dir>/step-00000010/state.safetensors  (on S3: state-<token>.safetensors, a new name per write)
    <dir>/step-00000010/manifest.json     {"step", "files": {name: {"bytes", "sha256"}}, "meta"}
    <dir>/LATEST                           "10" (written last: a step is never "latest" before it is durable)

Locally a step folder is written under a temporary name, every file fsynced, then renamed;
LATEST is replaced the same way. On S3, where each PUT is atomic but a folder is not, the data
object goes first under a fresh name, then the manifest that names it (so a step written again
never pairs a new manifest with old data, or old with new), then LATEST; the step LATEST names
is never deleted. Loading verifies each file's sha256 before parsing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save, save_file

from .storage import Location, fsync_dir, as_location, atomic_write_text, replace_dir  # noqa: F401 (re-exported)

_STATE_FILE = "state.safetensors"
_MANIFEST = "manifest.json"
_LATEST = "LATEST"
_FORMAT = "trainmem-durable-v1"


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file is missing, torn or fails its checksum; the message names the file."""


@dataclass
class LoadedCheckpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_step_marker(text: str, where: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise CheckpointCorrupt(f"{where}: expected a step number, found {text[:40]!r}")
    return int(text)


def parse_manifest(text: str, where: str, fmt: str, step: int) -> dict[str, Any]:
    """A step's JSON manifest, checked to be of format ``fmt`` and of ``step``; CheckpointCorrupt names ``where``."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or manifest.get("step") != step:
        raise CheckpointCorrupt(f"{where}: not a {fmt} manifest of step {step}")
    return manifest


def read_step_marker(marker: Path) -> int | None:
    """The step a LATEST-style marker file names; None if there is none yet."""
    return parse_step_marker(marker.read_text(), str(marker)) if marker.exists() else None


def read_manifest(path: Path, fmt: str, step: int) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: missing") from None
    return parse_manifest(text, str(path), fmt, step)


class DurableStore:
    """The durable tier at one location (a local folder or s3://bucket/prefix); keeps the newest ``keep`` steps."""

    def __init__(self, root: str | Path | Location, keep: int = 2):
        self.location = as_location(root)
        self.keep = keep

    @staticmethod
    def step_name(step: int) -> str:
        return f"step-{step:08d}"

    def step_dir(self, step: int) -> Path:
        """A local store's step folder (there is no folder on S3)."""
        if self.location.local is None:
            raise ValueError(f"{self.location.uri}: an S3 store has no local step folder")
        return self.location.local / self.step_name(step)

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path | str:
        """Write ``step`` (data, manifest, then LATEST); returns its folder (local) or its s3:// address."""
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        if self.location.local is not None:
            self._save_folder(step, tensors, meta)
        else:
            self._save_objects(step, tensors, meta)
        self._prune()
        # LATEST names the newest durable step; a replayed older save does not move it back.
        self.location.write_bytes(_LATEST, str(max(self.steps())).encode())
        return self.step_dir(step) if self.location.local is not None else self.location.describe(self.step_name(step))

    def _manifest(self, step: int, name: str, size: int, sha256: str, meta: dict[str, Any]) -> bytes:
        return json.dumps({"format": _FORMAT, "step": step, "files": {name: {"bytes": size, "sha256": sha256}},
                           "meta": meta}, indent=1, sort_keys=True).encode()

    def _save_folder(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        root = self.location.local
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state_path = tmp / _STATE_FILE
        save_file(tensors, str(state_path))
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        manifest = self._manifest(step, _STATE_FILE, state_path.stat().st_size, _sha256(state_path), meta)
        atomic_write_text(tmp / _MANIFEST, manifest.decode())
        fsync_dir(tmp)
        replace_dir(tmp, root / self.step_name(step))
        fsync_dir(root)

    def _save_objects(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        folder = self.location.child(self.step_name(step))
        previous = folder.names()
        data = save(tensors)
        name = f"state-{secrets.token_hex(6)}.safetensors"
        folder.write_bytes(name, data)
        folder.write_bytes(_MANIFEST, self._manifest(step, name, len(data), hashlib.sha256(data).hexdigest(), meta))
        for old in previous:  # data a replaced manifest named; no manifest names it any more
            if old not in (name, _MANIFEST):
                folder.delete(old)

    def _prune(self) -> None:
        steps = self.steps()
        keep_latest = self._latest_or_none()
        for step in steps[: max(0, len(steps) - self.keep)]:
            if step == keep_latest:
                continue
            folder = self.location.child(self.step_name(step))
            folder.delete(_MANIFEST)  # first: a half-deleted step is no longer listed
            self.location.delete(self.step_name(step))

    def _latest_or_none(self) -> int | None:
        try:
            return self.latest_step()
        except (CheckpointCorrupt, OSError):
            return None

    def steps(self) -> list[int]:
        """Steps with a manifest (not yet verified)."""
        out = []
        for name in self.location.names():
            if name.startswith("step-") and name[5:].isdigit() and self.location.exists(f"{name}/{_MANIFEST}"):
                out.append(int(name[5:]))
        return sorted(out)

    def latest_step(self) -> int | None:
        """The step named by LATEST, i.e. the newest checkpoint known durable."""
        if not self.location.exists(_LATEST):
            return None
        return parse_step_marker(self.location.read_text(_LATEST), self.location.describe(_LATEST))

    def read_manifest(self, step: int) -> dict[str, Any]:
        name = f"{self.step_name(step)}/{_MANIFEST}"
        try:
            text = self.location.read_text(name)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{self.location.describe(name)}: missing") from None
        return parse_manifest(text, self.location.describe(name), _FORMAT, step)

    def load(self, step: int | None = None) -> LoadedCheckpoint | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        manifest = self.read_manifest(step)
        folder = self.location.child(self.step_name(step))
        tensors_file = next((n for n in manifest["files"] if n.endswith(".safetensors")), None)
        if tensors_file is None:
            raise CheckpointCorrupt(f"{folder.describe(_MANIFEST)}: lists no .safetensors file")
        blobs = {name: self._verified(folder, name, info) for name, info in manifest["files"].items()}
        tensors = load(blobs[tensors_file]) if folder.local is None else load_file(str(folder.local / tensors_file))
        return LoadedCheckpoint(step=step, tensors=tensors, meta=manifest["meta"])

    @staticmethod
    def _verified(folder: Location, name: str, info: dict[str, Any]) -> bytes | None:
        """Check size and sha256 of one listed file: its bytes from S3; locally None (hashed as it streams,
        then memory-mapped by safetensors rather than copied)."""
        where = folder.describe(name)
        if folder.local is not None:
            path = folder.local / name
            if not path.is_file():
                raise CheckpointCorrupt(f"{where}: listed in the manifest but missing")
            size, sha, blob = path.stat().st_size, _sha256(path), None
        else:
            try:
                blob = folder.read_bytes(name)
            except FileNotFoundError:
                raise CheckpointCorrupt(f"{where}: listed in the manifest but missing") from None
            size, sha = len(blob), hashlib.sha256(blob).hexdigest()
        if size != info["bytes"] or sha != info["sha256"]:
            raise CheckpointCorrupt(f"{where}: checksum mismatch (torn or corrupted write; "
                                    f"{size} bytes, manifest says {info['bytes']})")
        return blob
