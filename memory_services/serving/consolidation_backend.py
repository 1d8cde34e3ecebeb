"""The consolidation deployment: the job on its cron schedule, and at once on request (both under the lease)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..config import ServicesConfig
from ..consolidation import ConsolidationJob, CronScheduler, LeaseHeld
from ..store import MemoryStore


class ConsolidationBackend:
    """Runs the job on its cron schedule in a thread; ``run_now`` runs it at once (both take the lease)."""

    def __init__(self, cfg: ServicesConfig, start_schedule: bool = True):
        store = MemoryStore(cfg.store_path, cfg.embedding_dim)
        log = lambda m: print(m, flush=True)  # noqa: E731 (Serve captures replica stdout in its logs)
        self.cron_job = ConsolidationJob(store, cfg.consolidation, layer_cfg=cfg.memory_layer.layer_config(),
                                         kind="cron", layer_dir=cfg.layer_dir, on_phase=log)
        self.http_job = ConsolidationJob(store, cfg.consolidation, layer_cfg=cfg.memory_layer.layer_config(),
                                         kind="http", layer_dir=cfg.layer_dir, on_phase=log)
        self.scheduler = CronScheduler(self.cron_job, cfg.consolidation.schedule, log=log)
        self.thread = self.scheduler.start() if start_schedule else None

    def run_now(self) -> dict[str, Any]:
        try:
            return {"ran": True, **dataclasses.asdict(self.http_job.run_once())}
        except LeaseHeld as e:
            return {"ran": False, "holder": e.holder, "error": str(e)}

    def status(self) -> dict[str, Any]:
        return {"runs": len(self.scheduler.runs), "skipped": len(self.scheduler.skipped),
                "next_run": self.scheduler.next_time(), "last_error": self.scheduler.last_error,
                "time": time.time()}

    def check_health(self) -> None:
        if self.thread is not None and not self.thread.is_alive() and not self.scheduler.stop_event.is_set():
            raise RuntimeError("consolidation scheduler thread died")
