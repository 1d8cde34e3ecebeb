"""metrics.jsonl and events.jsonl: one JSON object per line, appended, flushed at once.

The files live in run_dir on the driver's node. Ranks, which may run on nodes that do not share
that folder, write through the run's :class:`RunLogSink` actor (on the driver's node). Each line
is written with a single O_APPEND write, so sink and driver append without interleaving in a line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ray


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


def sink_name(run_dir: str | Path) -> str:
    """The Ray name of a run's log sink (one per run_dir, in the trainmem namespace)."""
    return "runlog-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0, max_concurrency=4)
class RunLogSink:
    """The run log on the driver's node, for ranks elsewhere: nothing a rank reports goes through run_dir files.

    Rank 0 sends each finished step's metrics here and waits for the append, so a rank that dies
    right after loses no line (as when it wrote the file itself, which needed a shared run_dir).
    """

    def __init__(self, run_dir: str):
        self.log = RunLog(Path(run_dir))

    def metric(self, record: dict[str, Any]) -> None:
        self.log.metric(record)

    def event(self, event_name: str, fields: dict[str, Any]) -> None:
        self.log.event(event_name, **fields)


def start_sink(run_dir: str | Path) -> Any:
    """The run's sink actor, pinned to this (the driver's) node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    sink = RunLogSink.options(name=sink_name(run_dir), get_if_exists=True,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(str(run_dir))
    ray.get(sink.__ray_ready__.remote(), timeout=60)
    return sink


class SinkClient:
    """A rank's handle on the run's sink; every call waits (bounded) for the line to be written.

    A sink that cannot be reached costs the line, never the step: the failure is printed to the
    rank's log, and metrics still reach the controller through its next health poll.
    """

    def __init__(self, run_dir: str | Path, timeout_s: float = 30.0):
        self.run_dir, self.timeout_s = run_dir, timeout_s
        self._sink = None

    def _actor(self) -> Any:
        if self._sink is None:
            self._sink = ray.get_actor(sink_name(self.run_dir))
        return self._sink

    def _send(self, method: str, *args: Any) -> None:
        try:
            ray.get(getattr(self._actor(), method).remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayError, ValueError) as e:  # ValueError: no sink of that name
            print(f"run log sink {sink_name(self.run_dir)}: {method} not written ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''})", flush=True)

    def metric(self, record: dict[str, Any]) -> None:
        self._send("metric", record)

    def event(self, event_name: str, /, **fields: Any) -> None:
        self._send("event", event_name, fields)
