"""Runs a consolidation job at each tick of a cron schedule (croniter), in a thread."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Callable

from croniter import croniter

from .job import ConsolidationJob, ConsolidationResult
from .lease import LeaseHeld


class CronScheduler:
    """``job.run_once`` at each tick until stopped. A run already going elsewhere (the lease) is
    skipped and named; a failed run is logged and retried at the next tick."""

    def __init__(self, job: ConsolidationJob, schedule: str, log: Callable[[str], None] = print):
        if not croniter.is_valid(schedule):
            raise ValueError(f"schedule={schedule!r} is not a valid cron expression, e.g. '*/10 * * * *'")
        self.job, self.schedule, self.log = job, schedule, log
        self.stop_event = threading.Event()
        self.runs: list[ConsolidationResult] = []
        self.skipped: list[str] = []
        """Lease holders that made a tick skip."""
        self.last_error = ""

    def next_time(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        return croniter(self.schedule, datetime.fromtimestamp(now, tz=timezone.utc)).get_next(float)

    def tick(self) -> ConsolidationResult | None:
        try:
            result = self.job.run_once()
        except LeaseHeld as e:
            self.skipped.append(e.holder["owner"])
            self.log(f"consolidate: tick skipped: {e}")
            return None
        except Exception as e:  # keep the schedule alive; the error is reported and retried
            self.last_error = f"{type(e).__name__}: {e}"
            self.log(f"consolidate: run failed: {self.last_error}")
            return None
        self.runs.append(result)
        self.log(f"consolidate: merged {result.merged} entries into {result.clusters} "
                 f"(conflicts {result.conflicts}, watermark {result.watermark}, {result.seconds:.2f}s)")
        return result

    def run(self, max_runs: int | None = None) -> None:
        ticks = 0
        while not self.stop_event.is_set() and (max_runs is None or ticks < max_runs):
            due = self.next_time()
            if self.stop_event.wait(max(0.0, due - time.time())):
                break
            self.tick()
            ticks += 1

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="consolidation-cron", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stop_event.set()
