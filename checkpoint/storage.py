"""Where checkpoints live: a local folder or ``s3://bucket/prefix``, read and written through ``pyarrow.fs``.

A :class:`Location` names one folder of either kind. Writes are atomic per object: locally a
temporary file is fsynced and renamed over the target (pyarrow's local filesystem does not
fsync, so this part uses the OS directly); on S3 an object becomes visible only when its PUT
(or multipart upload) completes, so a reader sees the old object or the new one, never half.
Nothing here orders several objects: the stores above write data first, their manifest next and
their step marker last.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from .config import StorageConfig

_S3 = "s3://"


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` (only s3:// is accepted by the config), False for a local path."""
    return "://" in location


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + fsync of the folder: ``path`` is the old bytes or the new ones."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # writers in threads too
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """An S3 client for ``storage`` (empty fields filled from the AWS_* variables, see StorageConfig)."""
    cfg = storage.resolved()
    scheme, _, host = cfg.endpoint.partition("://")
    return pafs.S3FileSystem(
        access_key=cfg.access_key_id or None, secret_key=cfg.secret_access_key or None,
        session_token=cfg.session_token or None, region=cfg.region,
        endpoint_override=host or None, scheme=scheme if host else "https",
        connect_timeout=cfg.connect_timeout_s, request_timeout=cfg.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    )


class Location:
    """One checkpoint folder, local or on S3; names below it are relative (``step-00000010/manifest.json``)."""

    def __init__(self, uri: str | Path, storage: StorageConfig | None = None, *, _fs: pafs.FileSystem | None = None):
        uri = str(uri)
        self.storage = storage or StorageConfig()
        if uri.startswith(_S3):
            self.uri = uri.rstrip("/")
            self.local: Path | None = None
            self.base = self.uri[len(_S3):]
            if not self.base or self.base.startswith("/"):
                raise ValueError(f"{uri!r}: expected s3://bucket/prefix")
            self.fs = _fs or s3_filesystem(self.storage)
        elif is_uri(uri):
            raise ValueError(f"{uri!r}: a checkpoint location is a local path or s3://bucket/prefix")
        else:
            self.local = Path(uri).expanduser().absolute()
            self.uri = self.base = str(self.local)
            self.fs = _fs or pafs.LocalFileSystem()

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def child(self, name: str) -> "Location":
        return Location(f"{self.uri}/{name}", self.storage, _fs=self.fs)

    def describe(self, name: str = "") -> str:
        """The full address of ``name`` (for messages)."""
        return f"{self.uri}/{name}" if name else self.uri

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def read_bytes(self, name: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        if not self.exists(name):
            raise FileNotFoundError(self.describe(name))
        with self.fs.open_input_stream(self._path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8", errors="replace")

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    def names(self) -> list[str]:
        """Names directly below this folder (files and folders); empty when it does not exist."""
        selector = pafs.FileSelector(self.base, recursive=False, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically create or replace the object ``name`` (folders above it are created locally)."""
        if self.local is not None:
            path = self.local / name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            return
        with self.fs.open_output_stream(self._path(name)) as out:  # visible only once complete
            out.write(data)

    def delete(self, name: str) -> None:
        """Remove the object or folder ``name``; nothing if it is not there."""
        info = self.fs.get_file_info(self._path(name))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(name))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._path(name))


def as_location(where: str | Path | Location, storage: StorageConfig | None = None) -> Location:
    return where if isinstance(where, Location) else Location(where, storage)
