"""metrics.jsonl and events.jsonl: one JSON object per line, appended, flushed at once.

Each line is written with a single O_APPEND write, so a worker may append an event (e.g. the
moment it injects its own failure) beside the driver without interleaving inside a line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.events_path = self.run_dir / "events.jsonl"

    def event(self, event_name: str, /, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event_name, **fields}
        append_jsonl(self.events_path, record)
        return record

    def metric(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path)
