"""Argument parsing that fails like the rest of trainmem: one line, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + exits 2
        raise UsageError(f"{self.prog}: {message} (fix: see {self.prog} --help)")


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def write_traceback(path: Path | None, exc: BaseException) -> Path:
    """Append ``exc``'s traceback to ``path`` (default: a file under the temp dir); returns the path."""
    if path is None:
        path = Path(tempfile.gettempdir()) / f"trainmem-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        f.write("".join(traceback.format_exception(exc)))
    return path
